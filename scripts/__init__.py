"""The reproduction scripts: each trains packaged configs and writes a table of docs/."""
