"""Orion demo app: GET any path -> {"app", "instance", "path", "headers"} as JSON, the
request's headers as the instance received them (what an app could read, and log).

Env: PORT (default 8080), ORION_APP, ORION_INSTANCE (set by Orion),
     DEMO_EXIT_AFTER=<seconds>: exit with code 3 after that long (crash-loop tests;
     0 exits at once). SIGTERM exits at once with code 0.
"""

import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def crash():
    say("demo-app: exiting with 3 as asked")
    os._exit(3)


class Handler(BaseHTTPRequestHandler):
    server_version = "orion-demo-app"

    def do_GET(self):
        body = json.dumps({
            "app": os.environ.get("ORION_APP"),
            "instance": os.environ.get("ORION_INSTANCE"),
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
        }).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        say("demo-app: %s %s" % (self.address_string(), fmt % args))


def main():
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    after = os.environ.get("DEMO_EXIT_AFTER")
    if after is not None and after.strip():
        seconds = float(after)
        if seconds <= 0:
            crash()
        timer = threading.Timer(seconds, crash)
        timer.daemon = True
        timer.start()
    port = int(os.environ.get("PORT") or 8080)
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    say("demo-app: listening on 0.0.0.0:%d (app %s, instance %s)"
        % (port, os.environ.get("ORION_APP"), os.environ.get("ORION_INSTANCE")))
    server.serve_forever()


if __name__ == "__main__":
    main()
