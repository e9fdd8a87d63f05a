"""Durable jobs: POST /jobs returns once the job is stored; GET polls; WS /ws/jobs/{id} attaches
to its progress and frames; POST .../cancel cancels; DELETE forgets."""

from __future__ import annotations

from fastapi import APIRouter, Response, WebSocket, WebSocketDisconnect

from server.api.deps import Owner, ServerState, State
from server.api.errors import ApiError, api_error_for
from server.api.schemas import ErrorBody, ErrorResponse, JobCreated, JobRequest, JobView
from server.api.stream import SlowClient, accept, deny, forward_events, websocket_owner
from server.contract import RequestState
from server.jobs import JobNotFound, JobRecord

router = APIRouter(prefix="/jobs", tags=["jobs"], responses={401: {"model": ErrorResponse}})
websocket_router = APIRouter(tags=["jobs"])


@router.post("", status_code=202, response_model=JobCreated,
             responses={422: {"model": ErrorResponse}, 429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def create_job(body: JobRequest, state: State, owner: Owner, response: Response) -> JobCreated:
    """Queue a generation and return at once, once the job is stored; poll GET /jobs/{id} or
    attach to WS /ws/jobs/{id}. The seed is drawn now if absent: a re-run gives the same images."""
    spec = state.accept(body.to_spec(owner, state.settings.default_preview_every, state.limits.image_shape))
    state.slots.acquire(owner)  # held until the job ends (JobService releases it)
    try:
        record = state.jobs.submit(spec)
    except BaseException:
        state.slots.release(owner)
        raise
    view = job_view(state, record)
    response.headers["Location"] = f"/jobs/{view.id}"
    return JobCreated(id=view.id, status=view.status, queue_position=view.queue_position, seed=spec.seed)


@router.get("/{job_id}", response_model=JobView, responses={404: {"model": ErrorResponse}})
async def get_job(job_id: str, state: State, owner: Owner) -> JobView:
    """Status, queue position, progress and ETA; the images once succeeded."""
    return job_view(state, state.jobs.get(job_id, owner))


@router.post("/{job_id}/cancel", response_model=JobView, responses={404: {"model": ErrorResponse}})
async def cancel_job(job_id: str, state: State, owner: Owner) -> JobView:
    """Cancel a queued or running job; answers once it has ended (at the engine's next step), so it
    says `cancelled`, and so does GET from then on. A finished job is unchanged."""
    state.jobs.get(job_id, owner)
    await state.jobs.cancel(job_id)
    return job_view(state, state.jobs.get(job_id, owner))


@router.delete("/{job_id}", response_model=JobView, responses={404: {"model": ErrorResponse}})
async def delete_job(job_id: str, state: State, owner: Owner) -> JobView:
    """Cancel the job if it is still queued or running, then forget it: GET answers 404 from now
    on. Returns the job as it ended."""
    state.jobs.get(job_id, owner)
    await state.jobs.cancel(job_id)
    view = job_view(state, state.jobs.get(job_id, owner))
    await state.jobs.delete(job_id)
    return view


@websocket_router.websocket("/ws/jobs/{job_id}")
async def attach(websocket: WebSocket, job_id: str, state: State) -> None:
    """The job's events from now on (after where it stands), or its outcome if it has ended; the
    socket closes after done or error. Detaching never cancels the job; a job interrupted by a
    restart goes on after it, so reconnect."""
    try:
        owner = websocket_owner(websocket, state)
        state.jobs.get(job_id, owner)
    except (ApiError, JobNotFound) as exc:
        await deny(websocket, exc if isinstance(exc, ApiError) else api_error_for(exc))
        return
    await accept(websocket)
    with state.metrics.websockets_open.track_inprogress():
        try:
            await forward_events(websocket, state.jobs.events(job_id), state.settings.ws_send_timeout_s)
        except (WebSocketDisconnect, SlowClient):
            pass  # detaching never cancels a job


def job_view(state: ServerState, record: JobRecord) -> JobView:
    base = dict(id=record.id, created=int(record.created), attempts=record.attempts)
    total = record.spec["steps"]
    if record.status == "succeeded":
        return JobView(**base, status="succeeded", queue_position=None, step=total, total=total, eta_s=0.0,
                       result=record.done())
    if not record.unfinished:
        return JobView(**base, status=record.status, queue_position=None, step=0, total=total, eta_s=None,
                       error=ErrorBody(**record.error))
    job = state.jobs.live_job(record.id)
    live = state.engine.status(job.handle.id) if job is not None and job.handle is not None else None
    if live is None:  # waiting for room in the engine, or ending this instant
        return JobView(**base, status=record.status, queue_position=None, step=0, total=total, eta_s=None)
    status = "queued" if live.state == RequestState.QUEUED else "running"
    return JobView(**base, status=status, queue_position=live.queue_position, step=live.step, total=live.total,
                   eta_s=live.eta_s)
