"""`mlflow ui --app-name skeldiff`: MLflow's own server, with a browser that has never chosen a workflow opening
experiments on their runs table.

MLflow 3.17's sidebar keeps the GenAI / Model training choice in the browser's localStorage (key
`mlflow.workflowType_v1`, GenAI when unset) and ignores the experiment's `mlflow.experimentKind` (mlflow/mlflow#24498;
the fix was never merged). This app serves MLflow's pages unchanged except for one script in the page head that sets
the key to Model training when the browser has no choice yet: a choice the user makes later is kept. Registered as
the `mlflow.app` entry point `skeldiff` (pyproject.toml).
"""

from __future__ import annotations

from mlflow.server.fastapi_app import app
from starlette.requests import Request
from starlette.responses import Response

# Runs before MLflow's bundle: the value is what the UI itself stores (a JSON string).
SEED = (b'<script>try{if(localStorage.getItem("mlflow.workflowType_v1")===null)'
        b'localStorage.setItem("mlflow.workflowType_v1",JSON.stringify("machine_learning"))}catch(e){}</script>')


@app.middleware("http")
async def seed_workflow_choice(request: Request, call_next):
    response = await call_next(request)
    if request.url.path.rstrip("/") not in ("", "/index.html") or "text/html" not in response.headers.get(
            "content-type", ""):
        return response
    body = b"".join([chunk async for chunk in response.body_iterator])
    body = body.replace(b"<head>", b"<head>" + SEED, 1)
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return Response(body, status_code=response.status_code, headers=headers)
