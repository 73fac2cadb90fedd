"""The HTTP server: task serving, adaptation jobs and metrics over the emulated chip."""
