"""`python -m app`: the arena for people who only want the demo.

The same process and defaults as `rahf-serve` (embedded base, bundles in adapters/, API and UI
on http://127.0.0.1:8000, UI at /ui), so the UI still runs on the shared engine.
"""

from app.server import main

if __name__ == "__main__":
    main()
