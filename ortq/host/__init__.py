"""Layer 2, the plugin host: the pluggy manager and the registries the stages look things up in.
Loads plugins by name (built-ins and entry points) and never imports them statically.
"""
