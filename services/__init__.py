"""feedrank's services. Each is an app with its own entry point; services never import each other."""
