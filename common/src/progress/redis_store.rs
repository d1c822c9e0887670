//! [`RedisProgress`]: the cluster's progress store (see the parent module).

use super::*;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

/// Lua: a tenant's usage `{unfinished jobs, queued samples}` from its set
/// of unfinished jobs (`set`), visiting each job's hash (`job_prefix .. id`);
/// members whose hash is gone are dropped. Prepended to the scripts that use it.
const USAGE_LUA_FN: &str = r#"
local function usage(set, job_prefix)
  local jobs, queued = 0, 0
  for _, id in ipairs(redis.call('SMEMBERS', set)) do
    local f = redis.call('HMGET', job_prefix .. id, 'num_samples', 'samples_done')
    if not f[1] then
      redis.call('SREM', set, id)
    else
      jobs = jobs + 1
      local left = tonumber(f[1]) - tonumber(f[2] or '0')
      if left > 0 then queued = queued + left end
    end
  end
  return jobs, queued
end
"#;

/// Create unless present, within the tenant's caps: `HSET` + `ZADD` + the
/// unfinished sets (+ the webhook) in one step.
/// KEYS: job, tenant_jobs, unfinished, tenant_unfinished, webhook.
/// ARGV: job id, tenant, num_shards, num_samples, created_at, max_jobs ('' = no
/// caps), max_queued_samples, job key prefix, callback url ('' = none), delivery id,
/// then field name/value pairs to set too (the sampling settings).
/// Returns {status, jobs, queued}: 1 created, 0 existed, -1 job cap, -2 sample cap.
const CREATE_BODY_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 0, 0} end
local jobs, queued = 0, 0
if ARGV[6] ~= '' then
  jobs, queued = usage(KEYS[4], ARGV[8])
  if jobs >= tonumber(ARGV[6]) then return {-1, jobs, queued} end
  if queued + tonumber(ARGV[4]) > tonumber(ARGV[7]) then return {-2, jobs, queued} end
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'tenant', ARGV[2], 'num_shards', ARGV[3],
  'num_samples', ARGV[4], 'samples_done', 0, 'shards_failed', 0, 'created_at', ARGV[5])
for i = 11, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
if ARGV[9] ~= '' then
  redis.call('HSET', KEYS[5], 'url', ARGV[9], 'state', 'pending', 'attempts', 0,
    'delivery', ARGV[10])
end
return {1, jobs, queued}
"#;

/// Create a batch's jobs (one tenant's) within the tenant's caps, all or
/// none, in one step; jobs that exist are skipped and not counted.
/// KEYS: tenant_jobs, unfinished, tenant_unfinished. ARGV: tenant, max_jobs,
/// max_queued_samples, job key prefix, number of jobs, then per job: id,
/// num_shards, num_samples, created_at, callback url ('' = none), delivery
/// id, n, then n field/value pairs.
/// Returns {status, jobs, queued, new jobs, new samples}: 1 created, -1 job
/// cap, -2 sample cap.
const CREATE_MANY_BODY_LUA: &str = r#"
local prefix = ARGV[4]
local entries = {}
local new_jobs, new_samples = 0, 0
local i = 6
for _ = 1, tonumber(ARGV[5]) do
  local n = tonumber(ARGV[i + 6])
  if redis.call('EXISTS', prefix .. ARGV[i]) == 0 then
    table.insert(entries, i)
    new_jobs = new_jobs + 1
    new_samples = new_samples + tonumber(ARGV[i + 2])
  end
  i = i + 7 + 2 * n
end
local jobs, queued = usage(KEYS[3], prefix)
if jobs + new_jobs > tonumber(ARGV[2]) then return {-1, jobs, queued, new_jobs, new_samples} end
if queued + new_samples > tonumber(ARGV[3]) then return {-2, jobs, queued, new_jobs, new_samples} end
for _, e in ipairs(entries) do
  local id = ARGV[e]
  local key = prefix .. id
  redis.call('HSET', key, 'state', 'queued', 'tenant', ARGV[1], 'num_shards', ARGV[e + 1],
    'num_samples', ARGV[e + 2], 'samples_done', 0, 'shards_failed', 0, 'created_at', ARGV[e + 3])
  local n = tonumber(ARGV[e + 6])
  for f = e + 7, e + 6 + 2 * n, 2 do redis.call('HSET', key, ARGV[f], ARGV[f + 1]) end
  redis.call('ZADD', KEYS[1], ARGV[e + 3], id)
  redis.call('SADD', KEYS[2], id)
  redis.call('SADD', KEYS[3], id)
  if ARGV[e + 4] ~= '' then
    redis.call('HSET', key .. ':webhook', 'url', ARGV[e + 4], 'state', 'pending', 'attempts', 0,
      'delivery', ARGV[e + 5])
  end
end
return {1, jobs, queued, new_jobs, new_samples}
"#;

/// KEYS: tenant_unfinished. ARGV: job key prefix. Returns {jobs, queued}.
const USAGE_BODY_LUA: &str = r#"
local jobs, queued = usage(KEYS[1], ARGV[1])
return {jobs, queued}
"#;

/// Takes due webhooks: each due job whose webhook is pending gets one more
/// attempt and is held until the lease ends; others leave the set.
/// KEYS: pending. ARGV: now_ms, lease_until_ms, limit, job key prefix.
/// Returns {id, url, delivery, attempt, body or ''} per webhook.
const CLAIM_WEBHOOKS_LUA: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(due) do
  local key = ARGV[4] .. id .. ':webhook'
  local f = redis.call('HMGET', key, 'state', 'url', 'delivery', 'body')
  if f[1] ~= 'pending' or not f[2] then
    redis.call('ZREM', KEYS[1], id)
  else
    local n = redis.call('HINCRBY', key, 'attempts', 1)
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    table.insert(out, {id, f[2], f[3] or '', tostring(n), f[4] or ''})
  end
end
return out
"#;

/// KEYS: webhook, pending. ARGV: job id, outcome (delivered|retry|failed),
/// error, at_ms. Returns 0 when the webhook is not pending (ignored).
const RECORD_WEBHOOK_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'state') ~= 'pending' then return 0 end
if ARGV[2] == 'delivered' then
  redis.call('HSET', KEYS[1], 'state', 'delivered')
  redis.call('ZREM', KEYS[2], ARGV[1])
elseif ARGV[2] == 'retry' then
  redis.call('HSET', KEYS[1], 'last_error', ARGV[3])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
else
  redis.call('HSET', KEYS[1], 'state', 'failed', 'last_error', ARGV[3])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return 1
"#;

/// A rebuilt job's webhook: recreated from the spec when its entry is gone
/// (Redis lost its data), and due now when the job is final and it is pending.
/// KEYS: webhook, pending. ARGV: job id, url ('' = none), delivery id, is_final
/// (0/1), now_ms.
const WEBHOOK_REBUILD_LUA: &str = r#"
if ARGV[2] ~= '' and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'url', ARGV[2], 'state', 'pending', 'attempts', 0,
    'delivery', ARGV[3])
end
if ARGV[4] == '1' and redis.call('HGET', KEYS[1], 'state') == 'pending' then
  redis.call('ZADD', KEYS[2], 'NX', ARGV[5], ARGV[1])
end
return 1
"#;

/// The state transition, atomic so that a final state cannot be overwritten
/// between our read and our write. The final state names come from Rust
/// (`JobState::is_final`) so the rule lives in one place. A final state
/// also takes the job out of its tenant's unfinished set (`{unfinished}:{tenant}`,
/// the tenant read from the hash), makes a pending webhook due now and
/// counts the job in `final_counts` (once: a final state is never left).
/// KEYS: job, unfinished, webhook, webhooks_pending, final_counts. ARGV: state, is_final (0/1),
/// now, has_error (0/1), error, job id, now_ms, final names...
/// Returns -1 unknown job, 0 ignored (already final), 1 done.
const SET_STATE_LUA: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return -1 end
for i = 8, #ARGV do
  if cur == ARGV[i] then return 0 end
end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
if ARGV[1] == 'running' then redis.call('HSETNX', KEYS[1], 'started_at', ARGV[3]) end
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[3])
  redis.call('HINCRBY', KEYS[5], ARGV[1], 1)
  redis.call('SREM', KEYS[2], ARGV[6])
  local tenant = redis.call('HGET', KEYS[1], 'tenant')
  if tenant then redis.call('SREM', KEYS[2] .. ':' .. tenant, ARGV[6]) end
  if redis.call('HGET', KEYS[3], 'state') == 'pending' then
    redis.call('ZADD', KEYS[4], 'NX', ARGV[7], ARGV[6])
  end
end
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'error', ARGV[5]) end
return 1
"#;

/// SADD decides whether the shard is new; only then the samples count (and
/// the valid ones, unless ARGV[3] is '').
/// KEYS: job, done. ARGV: shard, samples, valid samples or ''.
/// Returns -1 unknown job, -2 shard out of range (num_shards second), 0 old, 1 new.
const SHARD_DONE_LUA: &str = r#"
local n = redis.call('HGET', KEYS[1], 'num_shards')
if not n then return {-1, 0} end
if tonumber(ARGV[1]) >= tonumber(n) then return {-2, tonumber(n)} end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return {0, 0} end
redis.call('HINCRBY', KEYS[1], 'samples_done', ARGV[2])
if ARGV[3] ~= '' then redis.call('HINCRBY', KEYS[1], 'samples_valid', ARGV[3]) end
return {1, 0}
"#;

/// Like SHARD_DONE_LUA for failures; the first error is kept (it is usually
/// the cause, later ones its consequences).
/// KEYS: job, failed. ARGV: shard, error text.
const SHARD_FAILED_LUA: &str = r#"
local n = redis.call('HGET', KEYS[1], 'num_shards')
if not n then return {-1, 0} end
if tonumber(ARGV[1]) >= tonumber(n) then return {-2, tonumber(n)} end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return {0, 0} end
redis.call('HINCRBY', KEYS[1], 'shards_failed', 1)
redis.call('HSETNX', KEYS[1], 'error', ARGV[2])
return {1, 0}
"#;

/// One attempt fewer, not below zero (a missing counter stays missing).
/// KEYS: attempts. ARGV: shard. Returns the attempts left.
const FORGIVE_LUA: &str = r#"
local n = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if n <= 0 then return 0 end
return redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
"#;

/// Delete the key only if it still holds this job. KEYS: idem. ARGV: job id.
const RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// One page, atomic so that a job created between finding the cursor's rank
/// and reading the range cannot shift the page. Equal scores come in reverse
/// order of member, i.e. of UUIDv7 text: newest first as well.
/// KEYS: tenant_jobs. ARGV: limit (≥ 1), cursor or ''. Nil = unknown cursor.
const LIST_LUA: &str = r#"
local start = 0
if ARGV[2] ~= '' then
  local r = redis.call('ZREVRANK', KEYS[1], ARGV[2])
  if not r then return false end
  start = r + 1
end
return redis.call('ZREVRANGE', KEYS[1], start, start + tonumber(ARGV[1]) - 1)
"#;

/// The Redis implementation. Cheap to clone; clones share one multiplexed
/// connection.
#[derive(Clone)]
pub struct RedisProgress {
    conn: ConnectionManager,
    keys: RedisKeys,
    scripts: std::sync::Arc<Scripts>,
}

struct Scripts {
    create: Script,
    usage: Script,
    create_many: Script,
    claim_webhooks: Script,
    record_webhook: Script,
    webhook_rebuild: Script,
    set_state: Script,
    shard_done: Script,
    shard_failed: Script,
    forgive: Script,
    list: Script,
}

impl RedisProgress {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379/`); every key starts
    /// with `prefix`. The `ConnectionManager` reconnects by itself after the
    /// server restarts; calls made while it is away fail with
    /// `CommonError::Progress` instead of waiting or panicking.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self> {
        let client = redis::Client::open(url)?;
        // The library's 500 ms response timeout is tight for a Lua script on
        // a loaded machine; a few seconds still surfaces an outage promptly.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(4)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Ok(RedisProgress {
            conn,
            keys: RedisKeys::new(prefix),
            scripts: std::sync::Arc::new(Scripts {
                create: Script::new(&format!("{USAGE_LUA_FN}{CREATE_BODY_LUA}")),
                usage: Script::new(&format!("{USAGE_LUA_FN}{USAGE_BODY_LUA}")),
                create_many: Script::new(&format!("{USAGE_LUA_FN}{CREATE_MANY_BODY_LUA}")),
                claim_webhooks: Script::new(CLAIM_WEBHOOKS_LUA),
                record_webhook: Script::new(RECORD_WEBHOOK_LUA),
                webhook_rebuild: Script::new(WEBHOOK_REBUILD_LUA),
                set_state: Script::new(SET_STATE_LUA),
                shard_done: Script::new(SHARD_DONE_LUA),
                shard_failed: Script::new(SHARD_FAILED_LUA),
                forgive: Script::new(FORGIVE_LUA),
                list: Script::new(LIST_LUA),
            }),
        })
    }

    /// The key layout this store uses.
    pub fn keys(&self) -> &RedisKeys {
        &self.keys
    }

    fn job_failed(&self, job: JobId) -> String {
        self.keys.job_failed(job)
    }

    /// Every key matching `pattern` (SCAN, so Redis is never blocked).
    async fn scan(&self, pattern: &str) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut found = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            found.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        // SCAN may return a key more than once.
        found.sort();
        found.dedup();
        Ok(found)
    }

    /// The ids of the set at `key`, ascending; `what` names the set in
    /// the error about a member that is not an id.
    async fn id_set(&self, key: &str, what: &str) -> Result<Vec<JobId>> {
        let mut conn = self.conn.clone();
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(key)
            .query_async(&mut conn)
            .await?;
        let mut ids = members
            .iter()
            .map(|id| {
                id.parse()
                    .map_err(|_| CommonError::Other(format!("bad id {id:?} in {what}")))
            })
            .collect::<Result<Vec<JobId>>>()?;
        ids.sort();
        Ok(ids)
    }

    /// `RedisKeys::all()` with the prefix's glob characters escaped, so that
    /// SCAN cannot match (and `delete_all` delete) another prefix's keys.
    fn pattern(&self, all_like: &str) -> String {
        let literal = all_like.strip_suffix('*').unwrap_or(all_like);
        let mut escaped = String::with_capacity(literal.len() + 1);
        for c in literal.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                escaped.push('\\');
            }
            escaped.push(c);
        }
        escaped.push('*');
        escaped
    }
}

pub(super) fn field<T: std::str::FromStr>(
    map: &HashMap<String, String>,
    job: JobId,
    name: &str,
) -> Result<Option<T>> {
    match map.get(name) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            CommonError::Other(format!(
                "job {job}: bad field {name}={v:?} in progress store"
            ))
        }),
    }
}

pub(super) fn required<T: std::str::FromStr>(
    map: &HashMap<String, String>,
    job: JobId,
    name: &str,
) -> Result<T> {
    field(map, job, name)?.ok_or_else(|| {
        CommonError::Other(format!("job {job}: field {name} missing in progress store"))
    })
}

fn parse_job(
    job: JobId,
    map: HashMap<String, String>,
    shards_done: u64,
) -> Result<Option<JobProgress>> {
    if map.is_empty() {
        return Ok(None);
    }
    let state: String = required(&map, job, "state")?;
    Ok(Some(JobProgress {
        state: parse_state(&state)?,
        tenant: required(&map, job, "tenant")?,
        num_shards: required(&map, job, "num_shards")?,
        num_samples: required(&map, job, "num_samples")?,
        shards_done,
        samples_done: field(&map, job, "samples_done")?.unwrap_or(0),
        shards_failed: field(&map, job, "shards_failed")?.unwrap_or(0),
        error: map.get("error").cloned(),
        created_at: required(&map, job, "created_at")?,
        started_at: field(&map, job, "started_at")?,
        finished_at: field(&map, job, "finished_at")?,
        samples_valid: field(&map, job, "samples_valid")?,
        solver: field(&map, job, "solver")?.unwrap_or_default(),
        steps: field(&map, job, "steps")?,
        filter: match map.get("filter") {
            None => None,
            Some(f) => Some(serde_json::from_str(f).map_err(|_| {
                CommonError::Other(format!(
                    "job {job}: bad field filter={f:?} in progress store"
                ))
            })?),
        },
        steering: match map.get("steering") {
            None => None,
            Some(f) => Some(serde_json::from_str(f).map_err(|_| {
                CommonError::Other(format!("job {job}: bad field steering in progress store"))
            })?),
        },
        log_density: field(&map, job, "log_density")?.unwrap_or(false),
        flow_above: field(&map, job, "flow_above")?,
        from_structure: match map.get("from_structure") {
            None => None,
            Some(f) => Some(serde_json::from_str(f).map_err(|_| {
                CommonError::Other(format!(
                    "job {job}: bad field from_structure in progress store"
                ))
            })?),
        },
    }))
}

fn parse_heartbeat(map: HashMap<String, String>) -> Option<WorkerHeartbeat> {
    Some(WorkerHeartbeat {
        id: map.get("id")?.clone(),
        device: map.get("device")?.clone(),
        shard: map.get("shard").cloned(),
        samples_per_sec: map.get("samples_per_sec")?.parse().ok()?,
        at: map.get("at")?.parse().ok()?,
    })
}

/// Maps the `{status, num_shards}` reply of the shard scripts.
fn shard_reply(job: JobId, shard: u64, reply: (i64, u64)) -> Result<bool> {
    match reply.0 {
        -1 => Err(CommonError::NotFound(format!("job {job}"))),
        -2 => check_shard(job, shard, reply.1).map(|_| false),
        status => Ok(status == 1),
    }
}

impl RedisProgress {
    /// CREATE_BODY_LUA with `caps` (none: no check).
    async fn create(
        &self,
        spec: &JobSpec,
        caps: Option<TenantCaps>,
    ) -> Result<Option<LimitExceeded>> {
        let mut conn = self.conn.clone();
        let (max_jobs, max_samples) = match caps {
            Some(c) => (c.max_jobs.to_string(), c.max_queued_samples.to_string()),
            None => (String::new(), String::new()),
        };
        let (status, jobs, queued): (i64, u64, u64) = self
            .scripts
            .create
            .key(self.keys.job(spec.id))
            .key(self.keys.tenant_jobs(&spec.tenant))
            .key(self.keys.unfinished())
            .key(self.keys.tenant_unfinished(&spec.tenant))
            .key(self.keys.job_webhook(spec.id))
            .arg(spec.id.to_string())
            .arg(&spec.tenant)
            .arg(spec.num_shards())
            .arg(spec.num_samples)
            .arg(spec.created_at)
            .arg(max_jobs)
            .arg(max_samples)
            .arg(self.keys.job_prefix())
            .arg(spec.callback_url.as_deref().unwrap_or(""))
            .arg(delivery_id(spec.id))
            .arg(
                sampling_fields(spec)
                    .into_iter()
                    .chain([("samples_valid", "0".to_string())])
                    .flat_map(|(k, v)| [k.to_string(), v])
                    .collect::<Vec<_>>(),
            )
            .invoke_async(&mut conn)
            .await?;
        Ok(caps.and_then(|c| refusal(status, jobs, queued, spec.num_samples, c)))
    }
}

#[async_trait]
impl ProgressStore for RedisProgress {
    async fn create_job(&self, spec: &JobSpec) -> Result<()> {
        self.create(spec, None).await.map(|_| ())
    }

    async fn create_job_within(
        &self,
        spec: &JobSpec,
        caps: TenantCaps,
    ) -> Result<Option<LimitExceeded>> {
        self.create(spec, Some(caps)).await
    }

    async fn create_jobs_within(
        &self,
        specs: &[JobSpec],
        caps: TenantCaps,
    ) -> Result<Option<LimitExceeded>> {
        let Some(first) = specs.first() else {
            return Ok(None);
        };
        let tenant = &first.tenant;
        if let Some(other) = specs.iter().find(|s| &s.tenant != tenant) {
            return Err(CommonError::Invalid(format!(
                "jobs {} and {} belong to different tenants",
                first.id, other.id
            )));
        }
        let mut invocation = self.scripts.create_many.prepare_invoke();
        invocation
            .key(self.keys.tenant_jobs(tenant))
            .key(self.keys.unfinished())
            .key(self.keys.tenant_unfinished(tenant))
            .arg(tenant)
            .arg(caps.max_jobs)
            .arg(caps.max_queued_samples)
            .arg(self.keys.job_prefix())
            .arg(specs.len());
        for spec in specs {
            let fields: Vec<(&str, String)> = sampling_fields(spec)
                .into_iter()
                .chain([("samples_valid", "0".to_string())])
                .collect();
            invocation
                .arg(spec.id.to_string())
                .arg(spec.num_shards())
                .arg(spec.num_samples)
                .arg(spec.created_at)
                .arg(spec.callback_url.as_deref().unwrap_or(""))
                .arg(delivery_id(spec.id))
                .arg(fields.len());
            for (k, v) in fields {
                invocation.arg(k).arg(v);
            }
        }
        let mut conn = self.conn.clone();
        let (status, jobs, queued, _new_jobs, new_samples): (i64, u64, u64, u64, u64) =
            invocation.invoke_async(&mut conn).await?;
        Ok(refusal(status, jobs, queued, new_samples, caps))
    }

    async fn tenant_usage(&self, tenant: &str) -> Result<TenantUsage> {
        let mut conn = self.conn.clone();
        let (jobs, queued): (u64, u64) = self
            .scripts
            .usage
            .key(self.keys.tenant_unfinished(tenant))
            .arg(self.keys.job_prefix())
            .invoke_async(&mut conn)
            .await?;
        Ok(TenantUsage {
            unfinished_jobs: jobs,
            queued_samples: queued,
        })
    }

    async fn webhook(&self, job: JobId) -> Result<Option<WebhookStatus>> {
        let mut conn = self.conn.clone();
        let map: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys.job_webhook(job))
            .query_async(&mut conn)
            .await?;
        parse_webhook(job, map)
    }

    async fn claim_webhooks(
        &self,
        now_ms: u64,
        lease_until_ms: u64,
        limit: usize,
    ) -> Result<Vec<WebhookClaim>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let rows: Vec<(String, String, String, u32, String)> = self
            .scripts
            .claim_webhooks
            .key(self.keys.webhooks_pending())
            .arg(now_ms)
            .arg(lease_until_ms)
            .arg(limit)
            .arg(self.keys.job_prefix())
            .invoke_async(&mut conn)
            .await?;
        rows.into_iter()
            .map(|(id, url, delivery, attempt, body)| {
                let job = id.parse().map_err(|_| {
                    CommonError::Other(format!("bad job id {id:?} among the pending webhooks"))
                })?;
                Ok(WebhookClaim {
                    job,
                    url,
                    delivery,
                    attempt,
                    body: (!body.is_empty()).then_some(body),
                })
            })
            .collect()
    }

    async fn fix_webhook_body(&self, job: JobId, body: &str) -> Result<String> {
        let mut conn = self.conn.clone();
        let key = self.keys.job_webhook(job);
        let (fixed,): (Option<String>,) = redis::pipe()
            .atomic()
            .hset_nx(&key, "body", body)
            .ignore()
            .hget(&key, "body")
            .query_async(&mut conn)
            .await?;
        Ok(fixed.unwrap_or_else(|| body.to_string()))
    }

    async fn record_webhook_attempt(&self, job: JobId, outcome: WebhookAttempt<'_>) -> Result<()> {
        let (kind, error, at_ms) = match outcome {
            WebhookAttempt::Delivered => ("delivered", "", 0),
            WebhookAttempt::Retry { error, at_ms } => ("retry", error, at_ms),
            WebhookAttempt::GaveUp { error } => ("failed", error, 0),
        };
        let mut conn = self.conn.clone();
        let _recorded: i64 = self
            .scripts
            .record_webhook
            .key(self.keys.job_webhook(job))
            .key(self.keys.webhooks_pending())
            .arg(job.to_string())
            .arg(kind)
            .arg(error)
            .arg(at_ms)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn get(&self, job: JobId) -> Result<Option<JobProgress>> {
        let mut conn = self.conn.clone();
        // One MULTI: the hash and the done set as of the same moment.
        let (map, shards_done): (HashMap<String, String>, u64) = redis::pipe()
            .atomic()
            .hgetall(self.keys.job(job))
            .scard(self.keys.job_done(job))
            .query_async(&mut conn)
            .await?;
        parse_job(job, map, shards_done)
    }

    async fn set_state(&self, job: JobId, state: JobState, error: Option<&str>) -> Result<()> {
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.set_state.key(self.keys.job(job));
        invocation
            .key(self.keys.unfinished())
            .key(self.keys.job_webhook(job))
            .key(self.keys.webhooks_pending())
            .key(self.keys.final_counts())
            .arg(state_name(state))
            .arg(if state.is_final() { 1 } else { 0 })
            .arg(now_secs())
            .arg(if error.is_some() { 1 } else { 0 })
            .arg(error.unwrap_or(""))
            .arg(job.to_string())
            .arg(now_ms());
        for s in ALL_STATES.into_iter().filter(|s| s.is_final()) {
            invocation.arg(state_name(s));
        }
        let status: i64 = invocation.invoke_async(&mut conn).await?;
        match status {
            -1 => Err(CommonError::NotFound(format!("job {job}"))),
            0 => {
                tracing::debug!(%job, ?state, "job already final; state change ignored");
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn record_shard(
        &self,
        job: JobId,
        shard: u64,
        samples: u64,
        valid: Option<u64>,
    ) -> Result<bool> {
        let mut conn = self.conn.clone();
        let reply: (i64, u64) = self
            .scripts
            .shard_done
            .key(self.keys.job(job))
            .key(self.keys.job_done(job))
            .arg(shard)
            .arg(samples)
            .arg(valid.map(|v| v.to_string()).unwrap_or_default())
            .invoke_async(&mut conn)
            .await?;
        shard_reply(job, shard, reply)
    }

    async fn done_shards(&self, job: JobId) -> Result<Vec<u64>> {
        let mut conn = self.conn.clone();
        let mut done: Vec<u64> = redis::cmd("SMEMBERS")
            .arg(self.keys.job_done(job))
            .query_async(&mut conn)
            .await?;
        done.sort_unstable();
        Ok(done)
    }

    async fn start_attempt(&self, job: JobId, shard: u64) -> Result<ShardAttempts> {
        let mut conn = self.conn.clone();
        let key = self.keys.job_attempts(job);
        // Field `{shard}` counts starts, `{shard}:failed` reported failures.
        let (started, failed): (u32, Option<u32>) = redis::pipe()
            .atomic()
            .cmd("HINCRBY")
            .arg(&key)
            .arg(shard)
            .arg(1)
            .cmd("HGET")
            .arg(&key)
            .arg(format!("{shard}:failed"))
            .query_async(&mut conn)
            .await?;
        Ok(ShardAttempts {
            started,
            failed: failed.unwrap_or(0),
        })
    }

    async fn record_attempt_failed(&self, job: JobId, shard: u64) -> Result<u32> {
        let mut conn = self.conn.clone();
        let failed: u32 = redis::cmd("HINCRBY")
            .arg(self.keys.job_attempts(job))
            .arg(format!("{shard}:failed"))
            .arg(1)
            .query_async(&mut conn)
            .await?;
        Ok(failed)
    }

    async fn forgive_attempt(&self, job: JobId, shard: u64) -> Result<u32> {
        let mut conn = self.conn.clone();
        let left: u32 = self
            .scripts
            .forgive
            .key(self.keys.job_attempts(job))
            .arg(shard)
            .invoke_async(&mut conn)
            .await?;
        Ok(left)
    }

    async fn record_shard_failed(&self, job: JobId, shard: u64, reason: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        let reply: (i64, u64) = self
            .scripts
            .shard_failed
            .key(self.keys.job(job))
            .key(self.job_failed(job))
            .arg(shard)
            .arg(shard_error(shard, reason))
            .invoke_async(&mut conn)
            .await?;
        shard_reply(job, shard, reply).map(|_| ())
    }

    async fn list_jobs(
        &self,
        tenant: &str,
        limit: usize,
        cursor: Option<JobId>,
    ) -> Result<Vec<JobId>> {
        if limit == 0 {
            // ZREVRANGE 0 -1 would mean "everything".
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let page: Option<Vec<String>> = self
            .scripts
            .list
            .key(self.keys.tenant_jobs(tenant))
            .arg(limit)
            .arg(cursor.map(|c| c.to_string()).unwrap_or_default())
            .invoke_async(&mut conn)
            .await?;
        let page = page.ok_or_else(|| {
            CommonError::Invalid(format!(
                "cursor {} is not a job of tenant {tenant}",
                cursor.unwrap_or_default()
            ))
        })?;
        page.iter()
            .map(|id| {
                id.parse()
                    .map_err(|_| CommonError::Other(format!("bad job id {id:?} in progress store")))
            })
            .collect()
    }

    async fn idempotent_job(&self, tenant: &str, key: &str, job: JobId) -> Result<JobId> {
        let mut conn = self.conn.clone();
        // SET NX GET (Redis ≥ 7): bind and learn the earlier binding at once.
        let earlier: Option<String> = redis::cmd("SET")
            .arg(self.keys.idempotency(tenant, key))
            .arg(job.to_string())
            .arg("NX")
            .arg("GET")
            .arg("EX")
            .arg(IDEMPOTENCY_TTL_SECS)
            .query_async(&mut conn)
            .await?;
        match earlier {
            None => Ok(job),
            Some(id) => id
                .parse()
                .map_err(|_| CommonError::Other(format!("bad job id {id:?} in progress store"))),
        }
    }

    async fn release_idempotency(&self, tenant: &str, key: &str, job: JobId) -> Result<()> {
        let mut conn = self.conn.clone();
        let _deleted: i64 = Script::new(RELEASE_LUA)
            .key(self.keys.idempotency(tenant, key))
            .arg(job.to_string())
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn delete_job(&self, spec: &JobSpec) -> Result<()> {
        let mut conn = self.conn.clone();
        let id = spec.id;
        let () = redis::pipe()
            .atomic()
            .del(&[
                self.keys.job(id),
                self.keys.job_done(id),
                self.keys.job_attempts(id),
                self.job_failed(id),
                self.keys.job_webhook(id),
            ])
            .ignore()
            .zrem(self.keys.tenant_jobs(&spec.tenant), id.to_string())
            .ignore()
            .srem(self.keys.unfinished(), id.to_string())
            .ignore()
            .srem(self.keys.tenant_unfinished(&spec.tenant), id.to_string())
            .ignore()
            .zrem(self.keys.webhooks_pending(), id.to_string())
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn heartbeat(
        &self,
        worker_id: &str,
        info: &WorkerHeartbeat,
        ttl_secs: u64,
    ) -> Result<()> {
        if ttl_secs == 0 {
            return Err(CommonError::Invalid(
                "heartbeat ttl must be at least 1 s".into(),
            ));
        }
        let key = self.keys.worker(worker_id);
        let mut fields = vec![
            ("id", info.id.clone()),
            ("device", info.device.clone()),
            ("samples_per_sec", info.samples_per_sec.to_string()),
            ("at", info.at.to_string()),
        ];
        if let Some(shard) = &info.shard {
            fields.push(("shard", shard.clone()));
        }
        let mut conn = self.conn.clone();
        // DEL first so that a shard from the previous beat does not linger.
        let () = redis::pipe()
            .atomic()
            .del(&key)
            .ignore()
            .hset_multiple(&key, &fields)
            .ignore()
            .expire(&key, ttl_secs as i64)
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerHeartbeat>> {
        let keys = self.scan(&self.pattern(&self.keys.worker("*"))).await?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.hgetall(key);
        }
        let mut conn = self.conn.clone();
        let maps: Vec<HashMap<String, String>> = pipe.query_async(&mut conn).await?;
        let mut workers: Vec<WorkerHeartbeat> = maps
            .into_iter()
            .zip(&keys)
            .filter(|(map, _)| !map.is_empty()) // expired since the SCAN
            .filter_map(|(map, key)| {
                let beat = parse_heartbeat(map);
                if beat.is_none() {
                    // One bad entry must not hide every other worker.
                    tracing::warn!(%key, "unreadable worker heartbeat skipped");
                }
                beat
            })
            .collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(workers)
    }

    async fn rebuild_from_done(&self, spec: &JobSpec, done_shards: &[u64]) -> Result<()> {
        let state = derived_state(spec, done_shards);
        self.rebuild_with_state(spec, done_shards, state, None, None)
            .await
    }

    async fn rebuild_with_state(
        &self,
        spec: &JobSpec,
        done_shards: &[u64],
        state: JobState,
        error: Option<&str>,
        samples_valid: Option<u64>,
    ) -> Result<()> {
        let done: BTreeSet<u64> = done_shards.iter().copied().collect();
        let samples_done = done_samples(spec, &done)?;
        let num_shards = spec.num_shards();
        let now = now_secs();
        let is_final = state.is_final();
        let mut fields = vec![
            ("state", state_name(state)),
            ("tenant", spec.tenant.clone()),
            ("num_shards", num_shards.to_string()),
            ("num_samples", spec.num_samples.to_string()),
            ("samples_done", samples_done.to_string()),
            ("shards_failed", "0".to_string()),
            ("created_at", spec.created_at.to_string()),
            ("started_at", now.to_string()),
        ];
        if is_final {
            fields.push(("finished_at", now.to_string()));
        }
        if let Some(error) = error {
            fields.push(("error", error.to_string()));
        }
        if let Some(valid) = samples_valid {
            fields.push(("samples_valid", valid.to_string()));
        }
        fields.extend(sampling_fields(spec));
        let (job_key, done_key) = (self.keys.job(spec.id), self.keys.job_done(spec.id));
        // The final-state counts follow the entry's change of state.
        let mut conn = self.conn.clone();
        let prior: Option<String> = redis::cmd("HGET")
            .arg(&job_key)
            .arg("state")
            .query_async(&mut conn)
            .await?;
        let prior_final = prior
            .as_deref()
            .and_then(|s| parse_state(s).ok())
            .filter(|s| s.is_final());
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(&[&job_key, &done_key, &self.job_failed(spec.id)])
            .ignore()
            .hset_multiple(&job_key, &fields)
            .ignore();
        if prior_final != Some(state) {
            if let Some(p) = prior_final {
                pipe.hincr(self.keys.final_counts(), state_name(p), -1)
                    .ignore();
            }
            if is_final {
                pipe.hincr(self.keys.final_counts(), state_name(state), 1)
                    .ignore();
            }
        }
        if !done.is_empty() {
            pipe.sadd(&done_key, done.iter().collect::<Vec<_>>())
                .ignore();
        }
        pipe.zadd(
            self.keys.tenant_jobs(&spec.tenant),
            spec.id.to_string(),
            spec.created_at,
        )
        .ignore();
        let tenant_unfinished = self.keys.tenant_unfinished(&spec.tenant);
        if is_final {
            pipe.srem(self.keys.unfinished(), spec.id.to_string())
                .ignore()
                .srem(&tenant_unfinished, spec.id.to_string())
                .ignore();
        } else {
            pipe.sadd(self.keys.unfinished(), spec.id.to_string())
                .ignore()
                .sadd(&tenant_unfinished, spec.id.to_string())
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await?;
        let _: i64 = self
            .scripts
            .webhook_rebuild
            .key(self.keys.job_webhook(spec.id))
            .key(self.keys.webhooks_pending())
            .arg(spec.id.to_string())
            .arg(spec.callback_url.as_deref().unwrap_or(""))
            .arg(delivery_id(spec.id))
            .arg(if is_final { 1 } else { 0 })
            .arg(now_ms())
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn unfinished_jobs(&self) -> Result<Vec<JobId>> {
        self.id_set(&self.keys.unfinished(), "the unfinished set")
            .await
    }

    async fn count_jobs_by_state(&self) -> Result<Vec<(JobState, u64)>> {
        // Final states from their counters; queued and running from the
        // unfinished jobs, the only ones visited (not every job ever).
        let mut conn = self.conn.clone();
        let finals: HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(self.keys.final_counts())
            .query_async(&mut conn)
            .await?;
        let mut counts: HashMap<String, u64> = finals
            .into_iter()
            .map(|(k, v)| (k, v.max(0) as u64))
            .collect();
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.unfinished())
            .query_async(&mut conn)
            .await?;
        for batch in ids.chunks(500) {
            let mut pipe = redis::pipe();
            for id in batch {
                pipe.hget(format!("{}{id}", self.keys.job_prefix()), "state");
            }
            let states: Vec<Option<String>> = pipe.query_async(&mut conn).await?;
            for state in states.into_iter().flatten() {
                if parse_state(&state).is_ok_and(|s| !s.is_final()) {
                    *counts.entry(state).or_default() += 1;
                }
            }
        }
        Ok(ALL_STATES
            .into_iter()
            .map(|s| (s, counts.get(&state_name(s)).copied().unwrap_or(0)))
            .collect())
    }

    async fn register_batch_webhook(&self, batch: JobId, url: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .scripts
            .webhook_rebuild
            .key(self.keys.job_webhook(batch))
            .key(self.keys.webhooks_pending())
            .arg(batch.to_string())
            .arg(url)
            .arg(delivery_id(batch))
            .arg(0)
            .arg(now_ms())
            .invoke_async(&mut conn)
            .await?;
        let _: i64 = redis::cmd("SADD")
            .arg(self.keys.watched_batches())
            .arg(batch.to_string())
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn watched_batches(&self) -> Result<Vec<JobId>> {
        self.id_set(&self.keys.watched_batches(), "the watched batches")
            .await
    }

    async fn batch_ended(&self, batch: JobId) -> Result<()> {
        let mut conn = self.conn.clone();
        // Due first: a crash in between leaves the batch watched, and the
        // next look makes it due again (ZADD NX changes nothing then).
        let _: i64 = self
            .scripts
            .webhook_rebuild
            .key(self.keys.job_webhook(batch))
            .key(self.keys.webhooks_pending())
            .arg(batch.to_string())
            .arg("")
            .arg(delivery_id(batch))
            .arg(1)
            .arg(now_ms())
            .invoke_async(&mut conn)
            .await?;
        let _: i64 = redis::cmd("SREM")
            .arg(self.keys.watched_batches())
            .arg(batch.to_string())
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn forget_batch(&self, batch: JobId) -> Result<()> {
        let mut conn = self.conn.clone();
        let () = redis::pipe()
            .atomic()
            .srem(self.keys.watched_batches(), batch.to_string())
            .ignore()
            .del(self.keys.job_webhook(batch))
            .ignore()
            .zrem(self.keys.webhooks_pending(), batch.to_string())
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn delete_all(&self) -> Result<()> {
        let keys = self.scan(&self.pattern(&self.keys.all())).await?;
        let mut conn = self.conn.clone();
        for batch in keys.chunks(500) {
            let _deleted: u64 = redis::cmd("UNLINK")
                .arg(batch)
                .query_async(&mut conn)
                .await?;
        }
        Ok(())
    }
}
