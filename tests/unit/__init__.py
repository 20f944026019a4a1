"""Pure tests, milliseconds each: no servers, no processes, no sleeping."""
