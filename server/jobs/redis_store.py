"""The Redis job store: redis://[:password@]host:port/db, rediss:// (TLS) or unix:///path.sock,
shared by any number of server replicas.

Keys, under a prefix (`?prefix=...` in the URL, default `ddpm:`):
  <prefix>seq          INCR counter: acceptance order across replicas
  <prefix>job:<id>     hash: JobRecord's fields (spec and error as JSON, floats as repr), plus size
  <prefix>unfinished   sorted set: the queued and running jobs' keys, scored by seq
  <prefix>finished     sorted set: the other jobs' keys, scored by finish time
  <prefix>counts       hash: records by status
  <prefix>bytes        the stored results' total size

Every write is one Lua script, so Redis runs it atomically: a record, its set membership, the
counts and the byte total never disagree, whichever replica wrote last. The scripts check
before they write, so a call that raises StoreError has changed nothing (a reply lost after
Redis ran a script is the exception: the write stands; `add` retried then finds its own record
and succeeds). Standalone Redis (or a primary), not Redis Cluster: prune's script reaches keys
it is not given. The `redis` package is imported only when a Redis store is opened.
"""

from __future__ import annotations

import json
from urllib.parse import unquote, urlsplit

from .records import JobRecord, StoreError

DEFAULT_PREFIX = "ddpm:"
TIMEOUT_S = 5.0  # connecting, and each reply: a stuck Redis is a StoreError, not a hung server
KEYS = ("seq", "unfinished", "finished", "counts", "bytes")

# KEYS: job hash, seq, unfinished, finished, counts, bytes.
# ARGV: id, status, spec, attempts, created (repr), size, finish score, then the optional fields'
# name/value pairs (owner, finished, result, error). Returns the new seq; the record's seq if this
# very record (same spec and creation time) is stored already (a retried add); -1 if another
# record holds the id.
ADD = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local seen = redis.call('HMGET', KEYS[1], 'spec', 'created', 'seq')
  if seen[1] == ARGV[3] and seen[2] == ARGV[5] then return tonumber(seen[3]) end
  return -1
end
local seq = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'seq', seq, 'status', ARGV[2], 'spec', ARGV[3],
           'attempts', ARGV[4], 'created', ARGV[5], 'size', ARGV[6])
for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[2] == 'queued' or ARGV[2] == 'running' then
  redis.call('ZADD', KEYS[3], seq, KEYS[1])
else
  redis.call('ZADD', KEYS[4], ARGV[7], KEYS[1])
end
redis.call('HINCRBY', KEYS[5], ARGV[2], 1)
redis.call('INCRBY', KEYS[6], ARGV[6])
return seq
"""

# KEYS: job hash, unfinished, finished, counts, bytes.
# ARGV: status, attempts, size, finish score, number of fields to set, their field/value pairs,
# then the fields to delete. Returns 0 if the record is gone (deleted, pruned), else 1.
SAVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local old = redis.call('HMGET', KEYS[1], 'status', 'size', 'seq')
local pairs_at, count = 6, tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'attempts', ARGV[2], 'size', ARGV[3])
for i = pairs_at, pairs_at + 2 * count - 1, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for i = pairs_at + 2 * count, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
if ARGV[1] == 'queued' or ARGV[1] == 'running' then
  redis.call('ZREM', KEYS[3], KEYS[1])
  redis.call('ZADD', KEYS[2], old[3], KEYS[1])
else
  redis.call('ZREM', KEYS[2], KEYS[1])
  redis.call('ZADD', KEYS[3], ARGV[4], KEYS[1])
end
if old[1] ~= ARGV[1] then
  if redis.call('HINCRBY', KEYS[4], old[1], -1) <= 0 then redis.call('HDEL', KEYS[4], old[1]) end
  redis.call('HINCRBY', KEYS[4], ARGV[1], 1)
end
redis.call('INCRBY', KEYS[5], tonumber(ARGV[3]) - tonumber(old[2] or 0))
return 1
"""

# One record's removal, shared by DELETE and PRUNE.
REMOVE = """
local function remove(key)
  local old = redis.call('HMGET', key, 'status', 'size')
  if not old[1] then return 0 end
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[1], key)
  redis.call('ZREM', KEYS[2], key)
  if redis.call('HINCRBY', KEYS[3], old[1], -1) <= 0 then redis.call('HDEL', KEYS[3], old[1]) end
  redis.call('DECRBY', KEYS[4], tonumber(old[2] or 0))
  return 1
end
"""

# KEYS: unfinished, finished, counts, bytes, job hash. Returns how many records were removed.
DELETE = REMOVE + "return remove(KEYS[5])"

# KEYS: unfinished, finished, counts, bytes. ARGV: '(' .. finished_before, max_bytes.
# The expired first, then the oldest finished while the results exceed max_bytes.
PRUNE = REMOVE + """
local removed = 0
for _, key in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])) do
  removed = removed + remove(key)
end
local limit = tonumber(ARGV[2])
while tonumber(redis.call('GET', KEYS[4]) or 0) > limit do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then break end
  removed = removed + remove(oldest[1])
end
return removed
"""


# KEYS: unfinished. ARGV: worker, now, until. Takes the unfinished jobs no live server holds (see
# records.JobRepository.claim) and returns their keys, in seq order.
CLAIM = """
local claimed = {}
for _, key in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local held = redis.call('HMGET', key, 'worker', 'lease_until')
  if not held[1] or held[1] == ARGV[1] or not held[2] or tonumber(held[2]) < tonumber(ARGV[2]) then
    redis.call('HSET', key, 'worker', ARGV[1], 'lease_until', ARGV[3])
    claimed[#claimed + 1] = key
  end
end
return claimed
"""

# KEYS: unfinished. ARGV: worker, until.
RENEW = """
for _, key in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if redis.call('HGET', key, 'worker') == ARGV[1] then redis.call('HSET', key, 'lease_until', ARGV[2]) end
end
return 0
"""


class RedisRepository:
    """Job records in Redis, which several replicas may share. Durable as far as Redis is:
    records outlive this process; whether they outlive Redis is its persistence's business
    (appendonly yes, appendfsync everysec or always)."""

    durable = True

    def __init__(self, url: str):
        try:
            import redis
            from redis.backoff import ExponentialBackoff
            from redis.retry import Retry
        except ImportError:
            raise StoreError("redis:// needs the redis package: pip install 'ddpm-serve[redis]'") from None
        self.url, self.secret = redacted(url)
        self.errors = (redis.RedisError, OSError)
        connect_url, self.prefix = without_prefix(url)
        try:
            self.client = redis.Redis.from_url(
                connect_url, decode_responses=True, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S,
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 1), health_check_interval=30,
                client_name="ddpm-serve")
            try:
                self.client.ping()
            except BaseException:
                self.client.close()
                raise
            self.scripts = {name: self.client.register_script(source)
                            for name, source in (("add", ADD), ("save", SAVE), ("delete", DELETE), ("prune", PRUNE),
                                                 ("claim", CLAIM), ("renew", RENEW))}
        except (*self.errors, ValueError) as exc:
            raise StoreError(f"cannot open the job store {self.url}: {self.say(exc)}") from None
        self.keys = {name: self.prefix + name for name in KEYS}

    def say(self, exc: BaseException) -> str:
        """The error on one line, without the password."""
        text = " ".join(str(exc).split()) or type(exc).__name__
        for secret in filter(None, {self.secret, unquote(self.secret or "")}):
            text = text.replace(secret, "***")
        return text

    def call(self, what, *args, **kwargs):
        try:
            return what(*args, **kwargs)
        except self.errors as exc:
            raise StoreError(f"job store {self.url}: {self.say(exc)}") from None

    def record_of(self, fields: dict[str, str]) -> JobRecord:
        try:
            return record_of(fields)
        except (KeyError, TypeError, ValueError) as exc:  # written by something else
            raise StoreError(f"job store {self.url}: a damaged record {fields.get('id', '?')!r} "
                             f"({type(exc).__name__}: {exc})") from None

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def add(self, record: JobRecord) -> None:
        present = optional_fields(record)[0]
        if record.owner is not None:
            present.insert(0, ("owner", record.owner))
        keys = [self.job_key(record.id), *(self.keys[name] for name in KEYS)]
        seq = self.call(self.scripts["add"], keys=keys,
                        args=[record.id, record.status, json.dumps(record.spec), record.attempts,
                              repr(float(record.created)), record.size, finish_score(record),
                              *(value for pair in present for value in pair)])
        if seq == -1:
            raise StoreError(f"job store {self.url}: a job {record.id!r} is already stored")
        record.seq = int(seq)

    def save(self, record: JobRecord) -> None:
        present, absent = optional_fields(record)
        k = self.keys
        self.call(self.scripts["save"],
                  keys=[self.job_key(record.id), k["unfinished"], k["finished"], k["counts"], k["bytes"]],
                  args=[record.status, record.attempts, record.size, finish_score(record), len(present),
                        *(value for pair in present for value in pair), *absent])

    def get(self, job_id: str) -> JobRecord | None:
        fields = self.call(self.client.hgetall, self.job_key(job_id))
        return self.record_of(fields) if fields else None

    def delete(self, job_id: str) -> None:
        k = self.keys
        self.call(self.scripts["delete"],
                  keys=[k["unfinished"], k["finished"], k["counts"], k["bytes"], self.job_key(job_id)], args=[])

    def unfinished(self) -> list[JobRecord]:
        return self.read(self.call(self.client.zrange, self.keys["unfinished"], 0, -1))

    def read(self, keys: list[str]) -> list[JobRecord]:
        """The unfinished ones of these records, in seq order."""
        def hgetall_all() -> list[dict[str, str]]:
            pipe = self.client.pipeline(transaction=True)
            for key in keys:
                pipe.hgetall(key)
            return pipe.execute() if keys else []

        records = [self.record_of(fields) for fields in self.call(hgetall_all) if fields]  # one deleted meanwhile: gone
        return sorted((r for r in records if r.unfinished), key=lambda r: r.seq)

    def claim(self, worker: str, now: float, until: float) -> list[JobRecord]:
        keys = self.call(self.scripts["claim"], keys=[self.keys["unfinished"]],
                         args=[worker, repr(float(now)), repr(float(until))])
        return [r for r in self.read(keys) if r.worker == worker]

    def renew(self, worker: str, until: float) -> None:
        self.call(self.scripts["renew"], keys=[self.keys["unfinished"]], args=[worker, repr(float(until))])

    def prune(self, finished_before: float, max_bytes: int) -> int:
        k = self.keys
        return int(self.call(self.scripts["prune"], keys=[k["unfinished"], k["finished"], k["counts"], k["bytes"]],
                             args=["(" + repr(float(finished_before)), int(max_bytes)]))

    def counts(self) -> dict[str, int]:
        counts = self.call(self.client.hgetall, self.keys["counts"])
        return {status: int(n) for status, n in counts.items() if int(n) > 0}

    def close(self) -> None:
        try:
            self.client.close()
        except self.errors:
            pass


def optional_fields(record: JobRecord) -> tuple[list[tuple[str, str]], list[str]]:
    """The fields that may be None: those to set (name, value), and those to delete."""
    values = {"finished": None if record.finished is None else repr(float(record.finished)),
              "result": record.result,
              "error": None if record.error is None else json.dumps(record.error),
              "worker": record.worker,
              "lease_until": None if record.lease_until is None else repr(float(record.lease_until))}
    return ([(name, value) for name, value in values.items() if value is not None],
            [name for name, value in values.items() if value is None])


def finish_score(record: JobRecord) -> str:
    return repr(float(record.finished if record.finished is not None else record.created))


def record_of(fields: dict[str, str]) -> JobRecord:
    return JobRecord(id=fields["id"], owner=fields.get("owner"), spec=json.loads(fields["spec"]),
                     status=fields["status"], seq=int(fields["seq"]), attempts=int(fields["attempts"]),
                     created=float(fields["created"]),
                     finished=float(fields["finished"]) if "finished" in fields else None,
                     result=fields.get("result"),
                     error=json.loads(fields["error"]) if "error" in fields else None,
                     worker=fields.get("worker"),
                     lease_until=float(fields["lease_until"]) if "lease_until" in fields else None)


def without_prefix(url: str) -> tuple[str, str]:
    """The URL redis-py is given (its own query options kept), and the key prefix."""
    base, _, query = url.partition("?")
    items = [item for item in query.split("&") if item]
    prefix = next((unquote(item[len("prefix="):]) for item in items if item.startswith("prefix=")), DEFAULT_PREFIX)
    rest = "&".join(item for item in items if not item.startswith("prefix="))
    return base + ("?" + rest if rest else ""), prefix


def redacted(url: str) -> tuple[str, str | None]:
    """The URL with its password (user:PASSWORD@ or ?password=) shown as ***, and the password."""
    base, mark, query = url.partition("?")
    parts = urlsplit(base)
    secret = parts.password
    if secret is not None:
        user, _, host = parts.netloc.rpartition("@")
        base = base.replace(parts.netloc, f"{user.split(':', 1)[0]}:***@{host}", 1)
    items = query.split("&") if query else []
    secret = secret or next((unquote(item[9:]) for item in items if item.startswith("password=") and item[9:]), None)
    query = "&".join("password=***" if item.startswith("password=") else item for item in items)
    return base + mark + query, secret
