"""Schemathesis hooks for tests/tests/schemathesis.rs (SCHEMATHESIS_HOOKS).

Generated submissions name features nobody uploaded, so without help every
`POST /v1/jobs` and `POST /v1/batches` gets a 404 and the stateful phase has
no job to follow its links to (read, cancel, fetch). This hook makes most
submissions usable: the features the test uploaded
(`DIG_SCHEMATHESIS_FEATURES`), the fixture protein's sequence, 1 to 3
samples of 1 step (cheap to sample), at most 3 batch entries, in the cases
generated to be valid only; the other fields stay as generated.
"""

import os

import schemathesis

SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQLE"


def usable(entry):
    if not isinstance(entry, dict):
        return entry
    entry = dict(entry)
    entry["features_sha256"] = os.environ["DIG_SCHEMATHESIS_FEATURES"]
    entry["sequence"] = SEQUENCE
    n = entry.get("num_samples")
    entry["num_samples"] = 1 + (n % 3 if isinstance(n, int) and n > 0 else 0)
    entry["steps"] = 1
    entry.pop("shard_size", None)
    return entry


@schemathesis.hook
def map_case(context, case):
    # Only cases meant to be valid: a negative case stays as generated, so
    # that what made it invalid still reaches the API (and must be refused).
    meta = getattr(case, "meta", None)
    if meta is not None and meta.generation.mode.is_negative:
        return case
    operation = case.operation
    body = case.body
    if operation.method.upper() != "POST" or not isinstance(body, dict):
        return case
    if operation.path == "/v1/jobs":
        case.body = usable(body)
    elif operation.path == "/v1/batches" and isinstance(body.get("jobs"), list):
        body = dict(body)
        body["jobs"] = [usable(e) for e in body["jobs"][:3]]
        case.body = body
    return case
