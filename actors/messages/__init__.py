"""Every message that crosses a boundary, one module per boundary: `persistence`, `worker` (the
libtorrent worker's protocol), `session` (the session actor) and `wire` (the socket API). Frozen
pydantic models on one base, tagged by a literal field, decoded by one `TypeAdapter` per union."""
