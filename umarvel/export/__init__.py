"""Writers that hand a trained embedder to other libraries, so it is usable without umarvel's CLI."""
