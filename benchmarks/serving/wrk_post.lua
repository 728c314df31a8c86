-- wrk script: POST a prepared request body; prints a JSON summary line at the end.
-- usage: wrk -t1 -cN -dDs -s wrk_post.lua URL -- BODY_PATH CONTENT_TYPE [API_KEY] [MEAN_DELAY_MS]
-- MEAN_DELAY_MS > 0 paces each connection: between its requests it waits a uniformly random
-- 0 … 2×MEAN ms, so N connections offer about N / (MEAN + latency) requests per second.

function init(args)
  local handle = assert(io.open(args[1], "rb"))
  wrk.body = handle:read("*all")
  handle:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = args[2]
  if args[3] ~= nil and args[3] ~= "" then
    wrk.headers["X-API-Key"] = args[3]
  end
  mean_delay_ms = tonumber(args[4] or "0") or 0
end

function delay()
  if mean_delay_ms <= 0 then
    return 0
  end
  return math.random() * 2 * mean_delay_ms
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "non_2xx": %d, "connect_errors": %d, "read_errors": %d, '
    .. '"write_errors": %d, "timeouts": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, "mean_us": %.1f, "max_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.mean, latency.max))
end
