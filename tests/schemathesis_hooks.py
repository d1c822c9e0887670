"""Schemathesis hooks for tests/tests/schemathesis.rs (SCHEMATHESIS_HOOKS).

The OpenAPI document states every constraint a schema can state, and the
test runs Schemathesis' positive-data check: every request the document
calls valid must be accepted. What a schema cannot state is made to hold
here, in the cases generated to be valid only, each by name:

- features never uploaded: `features_sha256` becomes the features the test
  uploaded (`DIG_SCHEMATHESIS_FEATURES`), and `sequence` the fixture
  protein's (its length must equal the features');
- a model that exists: `model` is removed (the service's default);
- the model's own number of time steps bounds `steps` (1 here), and the
  samples are made cheap (1 to 3; no `shard_size`);
- a callback without a configured secret: the test tenants have no webhook
  secret, so `callback_url` is removed;
- partial diffusion: `from_structure` and `from_time` go together, the
  structures must have been uploaded by the tenant and be as long as the
  protein, and they do not combine with steering: `from_structure` becomes
  the structures the test uploaded (`DIG_SCHEMATHESIS_STRUCTURES`),
  `from_time` 0.5 when absent; both are removed with steering;
- `max_draw_factor` only with `filter`: `filter` is set to `physical`;
- `flow_above` does not combine with steering, `log_density` or solver
  `flow`: it is removed with any of them;
- steering: the solver becomes `euler`, `window` is put in order
  (t_start >= t_end), potentials that depend on the protein (`rmsd`, `q`:
  a reference with one point per residue; `distance`: residues within it)
  are replaced, and a `chain_break` term is added where more than one
  particle or a guidance needs a potential;
- integers written with a fraction (`2.0`): JSON Schema's `integer` takes
  them (2.0 equals 2), the API's JSON reader wants integer fields written
  as integers; whole floats are sent as integers;
- a shard's suffix and `?format=` must agree (`3.pdb?format=npz` is
  refused): a disagreeing `format` is dropped.

Negative cases stay as generated, so that what made them invalid still
reaches the API (and must be refused).
"""

import os

import schemathesis

SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQLE"
PROTEIN_SPECIFIC = ("rmsd", "q", "distance")


def usable_steering(steering):
    if not isinstance(steering, dict):
        return steering
    steering = dict(steering)
    window = steering.get("window")
    if isinstance(window, list) and len(window) == 2:
        steering["window"] = sorted(window, reverse=True)
    potentials = [
        p
        for p in steering.get("potentials", []) or []
        if not (isinstance(p, dict) and p.get("type") in PROTEIN_SPECIFIC)
    ]
    needs = steering.get("particles", 4) != 1 or steering.get("guidance", 0) not in (0, None)
    if needs and not potentials:
        potentials = [{"type": "chain_break"}]
    if "potentials" in steering or potentials:
        steering["potentials"] = potentials
    return steering


def whole(value):
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, list):
        return [whole(v) for v in value]
    if isinstance(value, dict):
        return {k: whole(v) for k, v in value.items()}
    return value


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
    entry.pop("callback_url", None)
    entry.pop("model", None)
    if entry.get("max_draw_factor") is not None and entry.get("filter") is None:
        entry["filter"] = "physical"
    if "from_structure" in entry or "from_time" in entry:
        if entry.get("steering") is not None:
            entry.pop("from_structure", None)
            entry.pop("from_time", None)
        elif entry.get("from_structure") is None and entry.get("from_time") is None:
            entry.pop("from_structure", None)
            entry.pop("from_time", None)
        else:
            entry["from_structure"] = os.environ["DIG_SCHEMATHESIS_STRUCTURES"]
            if entry.get("from_time") is None:
                entry["from_time"] = 0.5
    if entry.get("steering") is not None:
        entry["solver"] = "euler"
        entry["steering"] = usable_steering(entry["steering"])
    if entry.get("flow_above") is not None and (
        entry.get("steering") is not None
        or entry.get("log_density") is True
        or entry.get("solver") == "flow"
    ):
        entry.pop("flow_above")
    return entry


@schemathesis.hook
def before_call(context, case, kwargs):
    # Every phase's calls (examples, coverage, fuzzing, stateful) pass here;
    # Schemathesis revalidates a case an edit here changed, so what it calls
    # valid or invalid is judged on what is sent.
    meta = getattr(case, "meta", None)
    if meta is not None and meta.generation.mode.is_negative:
        return
    operation = case.operation
    if operation.path == "/v1/jobs/{id}/results/{shard}":
        shard = str((case.path_parameters or {}).get("shard", ""))
        query = case.query or {}
        suffix = shard.rsplit(".", 1)[1] if "." in shard else None
        if suffix is not None and query.get("format") not in (None, suffix):
            case.query = {k: v for k, v in query.items() if k != "format"}
        return
    body = case.body
    if operation.method.upper() != "POST" or not isinstance(body, dict):
        return
    body = whole(body)
    case.body = body
    if operation.path == "/v1/jobs":
        case.body = usable(body)
    elif operation.path == "/v1/batches" and isinstance(body.get("jobs"), list):
        body = dict(body)
        body["jobs"] = [usable(e) for e in body["jobs"][:3]]
        body.pop("callback_url", None)
        case.body = body
