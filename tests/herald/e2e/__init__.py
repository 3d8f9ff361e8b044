"""End-to-end tests: a real ``uvicorn`` subprocess on a free loopback port, real clients."""
