"""Herald: a real-time push gateway for asynchronous operations."""
