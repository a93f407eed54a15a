"""The web pages: a VM list with live state, controls, consoles in the browser (noVNC, xterm.js)
and a host overview, served by ``corral serve`` beside the REST API on its TCP listener.

The pages are static files (plain JS modules, no build step); every datum they show comes from
the REST API (``/v1``), so the API's sessions, CSRF checks and permissions are the pages' too.
This package adds what the API lacks for a browser: the VNC websocket proxy, a SPICE ``.vv``
file with a short-lived password, and the host's last hour of CPU/RAM samples. Front-end
packages are vendored from the npm registry at build time (``scripts/vendor-web.sh``).
"""
