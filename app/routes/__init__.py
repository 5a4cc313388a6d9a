"""HTTP routes: thin, each calls a service or the cache."""
