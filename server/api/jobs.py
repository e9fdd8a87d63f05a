"""Asynchronous jobs: POST /jobs returns at once; GET polls; DELETE cancels."""

from __future__ import annotations

from fastapi import APIRouter, Response

from server.api.deps import Owner, State
from server.api.schemas import ErrorResponse, GenerateRequest, JobCreated, JobView

router = APIRouter(prefix="/jobs", tags=["jobs"], responses={401: {"model": ErrorResponse}})


@router.post("", status_code=202, response_model=JobCreated,
             responses={422: {"model": ErrorResponse}, 429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def create_job(body: GenerateRequest, state: State, owner: Owner, response: Response) -> JobCreated:
    """Queue a generation and return at once; poll GET /jobs/{id}."""
    job = state.jobs.submit(state.accept(body.to_spec(owner)))
    view = state.jobs.view(job)
    response.headers["Location"] = f"/jobs/{view.id}"
    return JobCreated(id=view.id, status=view.status, queue_position=view.queue_position)


@router.get("/{job_id}", response_model=JobView, responses={404: {"model": ErrorResponse}})
async def get_job(job_id: str, state: State, owner: Owner) -> JobView:
    """Status, queue position, progress and ETA; the images once succeeded."""
    return state.jobs.view(state.jobs.get(job_id, owner))


@router.post("/{job_id}/cancel", response_model=JobView, responses={404: {"model": ErrorResponse}})
async def cancel_job(job_id: str, state: State, owner: Owner) -> JobView:
    """Cancel a queued or running job; answers once it has ended (at the engine's next step), so it
    says `cancelled`, and so does GET from then on. A finished job is unchanged."""
    job = state.jobs.get(job_id, owner)
    await state.jobs.cancel(job)
    return state.jobs.view(job)


@router.delete("/{job_id}", response_model=JobView, responses={404: {"model": ErrorResponse}})
async def delete_job(job_id: str, state: State, owner: Owner) -> JobView:
    """Cancel the job if it is still queued or running, then forget it: GET answers 404 from now
    on. Returns the job as it ended."""
    job = state.jobs.get(job_id, owner)
    await state.jobs.cancel(job)
    view = state.jobs.view(job)
    state.jobs.forget(job_id)
    return view
