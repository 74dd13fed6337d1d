"""The command line and the demo: they use the library; the library never imports them."""
