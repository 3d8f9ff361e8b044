"""Herald's benchmark: load generator, servers under test, scenarios A-E and their results."""
