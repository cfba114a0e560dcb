"""The console's pages and endpoints: server-rendered HTML, SSE for live runs and answers.

Every page is rendered here from the services' answers (`backend`); the browser's script
(`static/console.js`) only adds what a plain page cannot do: upload progress, checking a
parameter as it is typed, the live run chart and the streamed playground. Without it the
forms still work.

The pages live by area (`data`, `training`, `evaluation`, `playground`) over what they
share (`web`: sessions, sign-in, rendering, errors as messages); `Console` puts them
together and names their routes.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from loraforge.services.console.backend import Backend
from loraforge.services.console.config import ConsoleConfig
from loraforge.services.console.data import DataPages
from loraforge.services.console.evaluation import EvaluationPages
from loraforge.services.console.hosts import AllowedHosts, parse_allowed_hosts
from loraforge.services.console.playground import PlaygroundPages
from loraforge.services.console.training import TrainingPages
from loraforge.services.console.web import package_dir


class Console(DataPages, TrainingPages, EvaluationPages, PlaygroundPages):
    """Every page, over one `Backend` and the sessions."""

    def routes(self) -> list[Route | Mount]:
        p = self.page
        app = "/apps/{app}"
        ds = app + "/datasets/{dataset}"
        run = app + "/models/{model}/versions/{version}"
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/", p(self.apps_page), methods=["GET"]),
            Route("/apps", p(self.create_app), methods=["POST"]),
            Route(app, p(self.app_page), methods=["GET"]),
            Route(app + "/delete", p(self.delete_app), methods=["GET", "POST"]),
            Route(app + "/datasets", p(self.create_dataset), methods=["POST"]),
            Route(ds, p(self.dataset_page), methods=["GET"]),
            Route(ds + "/delete", p(self.delete_dataset), methods=["GET", "POST"]),
            Route(ds + "/upload", p(self.upload), methods=["POST"]),
            Route(ds + "/versions", p(self.create_version), methods=["POST"]),
            Route(app + "/train", p(self.train_page), methods=["GET"]),
            Route(app + "/train", p(self.train), methods=["POST"]),
            Route(app + "/runs", p(self.runs_page), methods=["GET"]),
            Route(run, p(self.run_page), methods=["GET"]),
            Route(run + "/events", p(self.run_events), methods=["GET"]),
            Route(run + "/cancel", p(self.cancel), methods=["POST"]),
            Route(run + "/evaluations", p(self.evaluations_page), methods=["GET"]),
            Route(run + "/evaluations", p(self.evaluate), methods=["POST"]),
            Route(run + "/evaluations/{evaluation}", p(self.evaluation_page), methods=["GET"]),
            Route(
                app + "/models/{model}/evaluations/{evaluation}",
                p(self.evaluation_page),
                methods=["GET"],
            ),
            Route(app + "/playground", p(self.playground_page), methods=["GET"]),
            Route(app + "/playground/stream", p(self.playground_stream), methods=["POST"]),
            Mount("/static", StaticFiles(directory=package_dir("static")), name="static"),
        ]


def create_app(config: ConsoleConfig, backend: Backend) -> Starlette:
    return Starlette(
        routes=Console(config, backend).routes(),
        middleware=[
            Middleware(
                AllowedHosts,
                bound_host=config.host,
                allowed=parse_allowed_hosts(config.allowed_hosts),
            )
        ],
    )
