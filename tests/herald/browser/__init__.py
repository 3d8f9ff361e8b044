"""The library in a real browser: headless Chromium against gateway processes."""
