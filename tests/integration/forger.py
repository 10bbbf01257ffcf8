"""A process with Redis access and nothing else, answering presigned mode's signing requests.

    python -m tests.integration.forger REDIS_URL QUEUE LISTENER_URL CAPTURED_JSON RECIPE...

It pops the sign requests of QUEUE (as the real signer would) and answers each with the next
RECIPE, then exits; one JSON line per answer on stdout ({"recipe": ..., "part": ...}).
CAPTURED_JSON holds genuine replies of the real signer ({"part": n, "reply": "..."}), to replay.
It has no signer key: its "wrong" MACs are made with a key of its own.
"""

from __future__ import annotations

import json
import sys

import redis

from workers import signer

#: in every forged URL's query: must never reach a log
FORGED_SECRET = "FORGEDSECRET0123"
RECIPES = ("own-url-no-mac", "other-part-wrong-mac", "replay-other-part", "replay-same-part", "forged-refusal",
           "garbage")


def forge(recipe: str, request: dict[str, object], listener: str, captured: list[dict[str, object]]) -> str:
    part = int(str(request["part"]))
    if recipe == "own-url-no-mac":
        return json.dumps({"url": f"{listener}/forged/{part}?X-Amz-Signature={FORGED_SECRET}",
                           "headers": {"Content-Length": "1"}})
    if recipe == "other-part-wrong-mac":
        reply: dict[str, object] = {
            "url": f"{listener}/bucket/other-key?uploadId=x&partNumber={part + 1}&X-Amz-Signature={FORGED_SECRET}",
            "headers": {"Content-Length": "1"}, "expires": 2**40}
        return json.dumps({**reply, "mac": signer.reply_mac("not-the-signer-key-" + "x" * 32, request, reply)})
    if recipe in ("replay-other-part", "replay-same-part"):
        same = recipe == "replay-same-part"
        return next(str(c["reply"]) for c in captured if (c["part"] == part) == same)
    if recipe == "forged-refusal":
        return json.dumps({"refused": "invalid", "error": "forged refusal", "expires": 2**40, "mac": "0" * 64})
    return "not json {"


def main(redis_url: str, queue: str, listener: str, captured_path: str, *recipes: str) -> None:
    client = redis.Redis.from_url(redis_url, socket_timeout=30)
    with open(captured_path) as file:
        captured = json.load(file)
    for recipe in recipes:
        popped = None
        while popped is None:  # (the test stops this process if no request comes)
            popped = client.blpop([signer.REQUESTS.format(queue)], timeout=2)
        request = json.loads(popped[1])
        reply_key = signer.REPLY.format(request["id"])
        client.rpush(reply_key, forge(recipe, request, listener, captured))
        client.expire(reply_key, 60)
        print(json.dumps({"recipe": recipe, "part": request["part"]}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
