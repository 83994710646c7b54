"""`leantune ui`: the guide, the planner, the runs and a chat (via `leantune serve`) on one local page (127.0.0.1, no internet).

    guide.py   the techniques the guide explains, as data
    runs.py    run folders under a root, read for the page
    app.py     the FastAPI app: the static page (leantune/assets/ui/) and its JSON API; /v1/* proxied to --serve
    server.py  port check and uvicorn
"""
