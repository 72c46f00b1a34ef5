"""The registry: what plugins declare (:mod:`.declarations`, :mod:`.quirks`), the hooks they may
implement (:mod:`.hookspecs`), the plugin manager that loads them (:mod:`.manager`), and the one
place a model's architecture is looked up and resolved (:mod:`.resolution`)."""
