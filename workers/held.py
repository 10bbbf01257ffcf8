"""Which part messages each worker node holds, so that a dead node's are sent again at once.

On a Redis broker, a message a worker received but has not acknowledged (a part
waiting for a window slot, a retry waiting for its countdown, a part being
sent) comes back only after the visibility timeout (2 hours here). A node
notes each part message it receives in a Redis hash of its own and forgets it
when the task ends; when its liveness record expires, the recovery pass reads
the hash, dispatches the parts in it that are neither done nor claimed, then drops it.
RabbitMQ returns a dead consumer's messages at once: nothing is noted there.
"""

from __future__ import annotations

from redis import Redis

#: node worker id -> {task id: "upload_id:part"}
HELD = "s3ferry:held:{}"
#: the nodes of a queue's fleet that have a HELD hash
NODES = "s3ferry:held-nodes:{}"
#: A node's hash outlives a lost task end (its process was killed) by at most this long.
TTL_SECONDS = 7 * 24 * 3600


def note(client: Redis, queue: str, node: str, delivery: str, upload_id: str, part: int) -> None:
    """`node` received a part message (`delivery`: task id and retry number)."""
    key = HELD.format(node)
    with client.pipeline(transaction=False) as pipe:
        pipe.hset(key, delivery, f"{upload_id}:{part}")
        pipe.expire(key, TTL_SECONDS)
        pipe.sadd(NODES.format(queue), node)
        pipe.execute()


def forget(client: Redis, node: str, delivery: str) -> None:
    """The task of that message ended (landed, skipped, failed, or retried as a new message)."""
    client.hdel(HELD.format(node), delivery)


def nodes(client: Redis, queue: str) -> list[str]:
    return sorted(n.decode() if isinstance(n, bytes) else n for n in client.smembers(NODES.format(queue)))


def peek(client: Redis, node: str) -> list[tuple[str, int]]:
    """The parts a (dead) node held (drop() them once they are dispatched again)."""
    return parse(client.hvals(HELD.format(node)))


def drop(client: Redis, queue: str, node: str) -> None:
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(HELD.format(node))
        pipe.srem(NODES.format(queue), node)
        pipe.execute()


def parse(values: list[bytes | str]) -> list[tuple[str, int]]:
    """(upload id, part number) of each well-formed note; anything else is skipped (Redis holds
    data, not authority: a note only makes the pass look at a part in Postgres)."""
    parts = set()
    for value in values:
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        upload_id, _, number = text.partition(":")
        if number.isascii() and number.isdecimal() and len(number) <= 5 and 1 <= int(number) <= 10_000:
            parts.add((upload_id, int(number)))
    return sorted(parts)
