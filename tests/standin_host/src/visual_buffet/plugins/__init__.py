"""Plugin interface and loader of the stand-in host."""
