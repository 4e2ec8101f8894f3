"""Admin API: /admin/*, behind a bearer token."""
