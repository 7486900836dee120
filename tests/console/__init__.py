"""Console tests: the Flask test client for every route and role, and Playwright in Chromium."""
