"""The console's routes: pages, their live JSON, outputs, and the buttons' POSTs.

Handlers are plain functions: Starlette runs them in its thread pool, where the API's blocking
Postgres, Redis and S3 calls belong.
"""

from __future__ import annotations

from functools import lru_cache

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from farm.api import Farm
from farm.errors import FarmError, JobNotFound, NotDone, TransientError
from farm.job import output_records
from farm.ui import media, views
from farm.ui.format import FILTERS
from farm.ui.security import TOKEN_FIELD, BasicAuth, Csrf


def create_app(farm: Farm, *, user: str, password: str) -> Starlette:
    """The console for ``farm``, answering only requests with this user and password."""
    console = Console(farm, Csrf())
    routes = [
        Route("/", console.home),
        Route("/batches", console.batches),
        Route("/batches/{batch_id}", console.batch),
        Route("/batches/{batch_id}/live", console.batch_live),
        Route("/batches/{batch_id}/resume-failed", console.resume_failed, methods=["POST"]),
        Route("/jobs", console.jobs),
        Route("/jobs/{job_id}", console.job),
        Route("/jobs/{job_id}/live", console.job_live),
        Route("/jobs/{job_id}/output", console.output),
        Route("/jobs/{job_id}/thumbnail", console.thumbnail),
        Route("/jobs/{job_id}/resume", console.resume, methods=["POST"]),
        Route("/jobs/{job_id}/cancel", console.cancel, methods=["POST"]),
        Route("/workers", console.workers),
        Route("/workers/live", console.workers_live),
        Mount("/static", StaticFiles(packages=[("farm.ui", "static")]), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(BasicAuth, user=user, password=password)],
        exception_handlers={FarmError: console.farm_error, HTTPException: console.http_error},
    )
    # Paths, not URLs: links and forms stay on whatever host the browser used, and a form's
    # CSRF token is made for the path its POST arrives at.
    console.templates.env.globals["path_for"] = lambda name, **params: str(
        app.url_path_for(name, **params)
    )
    return app


class Console:
    """The handlers, over one Farm."""

    def __init__(self, farm: Farm, csrf: Csrf) -> None:
        self.farm, self.csrf = farm, csrf
        env = Environment(
            loader=PackageLoader("farm.ui", "templates"),
            autoescape=select_autoescape(default=True),
        )
        env.filters.update(FILTERS)
        env.globals.update(csrf=csrf.token, token_field=TOKEN_FIELD)
        self.templates = Jinja2Templates(env=env)

    def page(self, request: Request, name: str, status: int = 200, **context) -> Response:
        return self.templates.TemplateResponse(request, name, context, status_code=status)

    def live(self, request: Request, name: str, finished: bool, **context) -> JSONResponse:
        """A page's live part, rendered again, for its script to swap in."""
        html = self.templates.get_template(name).render(request=request, **context)
        return JSONResponse({"html": html, "finished": finished})

    # -- pages ---------------------------------------------------------------------------------

    def home(self, request: Request) -> Response:
        return RedirectResponse(str(request.app.url_path_for("batches")), 303)

    def batches(self, request: Request) -> Response:
        return self.page(request, "batches.html", rows=views.recent_batches(self.farm))

    def batch(self, request: Request) -> Response:
        view = self._batch_view(request)
        return self.page(request, "batch.html", view=view)

    def batch_live(self, request: Request) -> Response:
        view = self._batch_view(request)
        return self.live(request, "batch_live.html", view.counts.finished, view=view)

    def _batch_view(self, request: Request) -> views.BatchView:
        view = views.batch_view(self.farm, request.path_params["batch_id"])
        if view is None:
            raise HTTPException(404, f"No batch with id {request.path_params['batch_id']!r}.")
        return view

    def jobs(self, request: Request) -> Response:
        return self.page(request, "jobs.html", jobs=self.farm.jobs(limit=100))

    def job(self, request: Request) -> Response:
        view = views.job_view(self.farm, request.path_params["job_id"])
        return self.page(request, "job.html", view=view)

    def job_live(self, request: Request) -> Response:
        view = views.job_view(self.farm, request.path_params["job_id"])
        return self.live(request, "job_live.html", view.info.finished, view=view)

    def workers(self, request: Request) -> Response:
        return self.page(request, "workers.html", rows=views.workers(self.farm))

    def workers_live(self, request: Request) -> Response:
        return self.live(request, "workers_live.html", False, rows=views.workers(self.farm))

    # -- outputs -------------------------------------------------------------------------------

    def output(self, request: Request) -> Response:
        """The output through the farm's store: whole, checked against its record, or the
        range a player asks for, read from the store alone."""
        job = self.farm.get(request.path_params["job_id"])
        record = self._output_record(job.id)
        store = self.farm.ctx.store
        return media.ranged(
            request,
            record.size or 0,
            job.result,
            lambda offset, length: store.get_range(record.key, offset, length),
            views.content_type(record.key),
        )

    def thumbnail(self, request: Request) -> Response:
        job = self.farm.get(request.path_params["job_id"])
        record = self._output_record(job.id)
        png = self._thumbnail(job.id, record.checksum, views.content_type(record.key))
        return Response(png, media_type="image/png")

    def _output_record(self, job_id: str):
        record = output_records(self.farm.ctx, [job_id]).get(job_id)
        if record is None:
            raise NotDone(f"job {job_id} has no output yet")
        return record

    @lru_cache(maxsize=256)  # noqa: B019 -- one Console per app, for the app's life
    def _thumbnail(self, job_id: str, checksum: str | None, media_type: str) -> bytes:
        """Made once per output (its checksum: an output rendered again is a new one)."""
        return media.thumbnail(self.farm.get(job_id).result(), media_type)

    # -- buttons -------------------------------------------------------------------------------

    # Async only to read the form; the API's calls go to the thread pool.

    async def resume(self, request: Request) -> Response:
        await self.csrf.check(request)
        job_id = request.path_params["job_id"]
        await run_in_threadpool(lambda: self.farm.resume(self.farm.get(job_id).id))
        return RedirectResponse(str(request.app.url_path_for("job", job_id=job_id)), 303)

    async def cancel(self, request: Request) -> Response:
        await self.csrf.check(request)
        job_id = request.path_params["job_id"]
        await run_in_threadpool(lambda: self.farm.cancel(self.farm.get(job_id).id))
        return RedirectResponse(str(request.app.url_path_for("job", job_id=job_id)), 303)

    async def resume_failed(self, request: Request) -> Response:
        await self.csrf.check(request)
        batch_id = request.path_params["batch_id"]
        await run_in_threadpool(self.farm.resume_failed, batch_id)
        return RedirectResponse(str(request.app.url_path_for("batch", batch_id=batch_id)), 303)

    # -- errors --------------------------------------------------------------------------------

    def farm_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, FarmError)
        status = 409  # a request the job's state refuses: NOT_DONE, NOT_RESUMABLE...
        if isinstance(exc, JobNotFound):
            status = 404
        elif isinstance(exc, TransientError):
            status = 503
        return self.page(request, "error.html", status, code=exc.code, message=exc.message)

    def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return self.page(
            request, "error.html", exc.status_code, code=str(exc.status_code), message=exc.detail
        )
