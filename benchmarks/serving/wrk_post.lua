-- wrk script: POST a prepared request body; prints a JSON summary line at the end.
-- usage: wrk -t1 -cN -dDs -s wrk_post.lua URL -- BODY_PATH CONTENT_TYPE [API_KEY] [MEAN_DELAY_MS]
-- BODY_PATH "@LIST" names a file listing body paths, one per line: requests send them in turn,
-- starting at a random one (so successive runs do not replay the same bodies first).
-- MEAN_DELAY_MS > 0 paces each connection: between its requests it waits a uniformly random
-- 0 … 2×MEAN ms, so N connections offer about N / (MEAN + latency) requests per second.

function read_file(path)
  local handle = assert(io.open(path, "rb"))
  local content = handle:read("*all")
  handle:close()
  return content
end

function init(args)
  bodies = {}
  if string.sub(args[1], 1, 1) == "@" then
    for path in io.lines(string.sub(args[1], 2)) do
      bodies[#bodies + 1] = read_file(path)
    end
  else
    bodies[1] = read_file(args[1])
  end
  wrk.body = bodies[1]
  math.randomseed(os.time())
  next_body = math.random(#bodies)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = args[2]
  if args[3] ~= nil and args[3] ~= "" then
    wrk.headers["X-API-Key"] = args[3]
  end
  mean_delay_ms = tonumber(args[4] or "0") or 0
end

function request()
  local body = bodies[next_body]
  next_body = next_body % #bodies + 1
  return wrk.format(nil, nil, nil, body)
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
