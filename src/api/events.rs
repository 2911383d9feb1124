//! `/api/events`: the admin's view of the events log, paged by id, or followed live as
//! Server-Sent Events.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::IntoParams;

use super::error::ApiError;
use super::handler::{Endpoint, endpoint, require_admin};
use super::views::{ErrorBody, EventPage};
use crate::auth::Caller;
use crate::context::Context;
use crate::model::InvalidInput;

pub(super) fn endpoints() -> Vec<Endpoint> {
    vec![
        endpoint(Method::GET, "/api/events", list_events),
        endpoint(Method::GET, "/api/events/stream", stream_events),
    ]
}

/// Query of `GET /api/events`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct EventsQuery {
    /// Only events with a larger id (0: from the start).
    #[serde(default)]
    after: u64,
    /// At most this many (1..=1000, default 100).
    limit: Option<u32>,
    /// Instead of paging from `after`: the latest this many (1..=1000).
    last: Option<u32>,
}

#[utoipa::path(get, path = "/api/events", tag = "events",
    params(EventsQuery),
    responses(
        (status = 200, description = "A page of events, oldest first", body = EventPage),
        (status = 422, description = "A bound is out of range", body = ErrorBody),
    ))]
pub(super) async fn list_events(
    State(ctx): State<Context>,
    caller: Caller,
    query: Result<axum::extract::Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    require_admin(&caller)?;
    let axum::extract::Query(query) =
        query.map_err(|e| ApiError::BadRequest(format!("invalid query: {}", e.body_text())))?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(InvalidInput::new("limit", "must be between 1 and 1000").into());
    }
    let events = match query.last {
        Some(n) if (1..=1000).contains(&n) => ctx.store.latest_events(n).await?,
        Some(_) => {
            return Err(InvalidInput::new("last", "must be between 1 and 1000").into());
        }
        None => ctx.store.events_after(query.after, limit).await?,
    };
    let next = events.last().map_or(query.after, |e| e.id);
    Ok(Json(EventPage { events, next }).into_response())
}

/// How often the event stream looks for new events. Polling the table (rather than an
/// in-process channel) shows the events of every Orion process sharing the database.
const STREAM_POLL: Duration = Duration::from_millis(250);

#[utoipa::path(get, path = "/api/events/stream", tag = "events",
    params(("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event (default: from now)")),
    responses(
        (status = 200, description = "Server-Sent Events: `id` the event id, `event` its kind, `data` the Event as JSON",
            content_type = "text/event-stream", body = crate::store::Event),
        (status = 403, description = "A tenant token", body = ErrorBody),
    ))]
pub(super) async fn stream_events(
    State(ctx): State<Context>,
    caller: Caller,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    use futures::StreamExt;
    require_admin(&caller)?;
    // A reconnecting client says where it stopped; a new one starts from now.
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let start = match resume {
        Some(id) => id,
        None => ctx.store.last_event_id().await?,
    };
    let stopping = ctx.stopping.clone().cancelled_owned();
    let stream = futures::stream::unfold((ctx, start), |(ctx, after)| async move {
        loop {
            match ctx.store.events_after(after, 100).await {
                Ok(events) if !events.is_empty() => {
                    let next = events.last().map_or(after, |e| e.id);
                    let items: Vec<Result<SseEvent, std::convert::Infallible>> = events
                        .into_iter()
                        .map(|e| {
                            Ok(SseEvent::default()
                                .id(e.id.to_string())
                                .event(e.kind.clone())
                                .json_data(&e)
                                .expect("an event serialises"))
                        })
                        .collect();
                    return Some((futures::stream::iter(items), (ctx, next)));
                }
                // Nothing new, or the database is away: look again shortly.
                _ => tokio::time::sleep(STREAM_POLL).await,
            }
        }
    });
    Ok(Sse::new(stream.flatten().take_until(stopping))
        .keep_alive(KeepAlive::default())
        .into_response())
}
