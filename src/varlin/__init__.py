"""varlin."""
