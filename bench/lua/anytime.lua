-- wrk script of `make bench`: POSTs images to the Anytime server and reads what it answered.
--
-- Environment (set by bench/wrk.py):
--   BENCH_IMAGES       file listing image paths, one per line (sent round robin)
--   BENCH_PATHS        file listing request paths, one per line (round robin, e.g. /classify?max_exit=2)
--   BENCH_CONTENT_TYPE content type of the bodies (image/png)
--   BENCH_RATE         total requests per second: each connection waits an exponential time with
--                      mean CONNECTIONS / RATE before each request, so arrivals are close to Poisson
--                      (unset: closed loop, each connection sends as soon as it has its answer)
--   BENCH_CONNECTIONS  the -c value (needed with BENCH_RATE)
--   BENCH_DEADLINE_MS  sent as X-Deadline-Ms, and the bound for attainment
--   BENCH_HEADER       one more request header, "Name: value" (e.g. Inference-Header-Content-Length)
-- done() prints one line "BENCH_JSON {...}" with the counts bench/wrk.py reads.

-- common.lua sits beside this script; wrk gives the script's path in its chunk name.
local common = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")
local lines, threads = common.lines, common.threads
setup = common.setup

function init(args)
  bodies = common.bodies("BENCH_IMAGES")
  paths = lines(os.getenv("BENCH_PATHS"))
  if #paths == 0 then paths = { "/classify" } end
  headers = {
    ["Host"] = wrk.headers["Host"] or (wrk.host .. ":" .. wrk.port),  -- HTTP/1.1 needs it; Netty waits without
    ["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE") or "image/png",
  }
  deadline = tonumber(os.getenv("BENCH_DEADLINE_MS") or "")
  if deadline then headers["X-Deadline-Ms"] = tostring(deadline) end
  local extra_name, extra_value = string.match(os.getenv("BENCH_HEADER") or "", "^([^:]+):%s*(.*)$")
  if extra_name then headers[extra_name] = extra_value end
  local rate = tonumber(os.getenv("BENCH_RATE") or "")
  local conns = tonumber(os.getenv("BENCH_CONNECTIONS") or "1")
  mean_delay_ms = rate and (1000 * conns / rate) or nil
  math.randomseed(1000 + id)
  i_body, i_path = id * 7919, id * 104729  -- threads start at different places in the lists
  n, ok, server_met, early = 0, 0, 0, 0
  status = {}
  exits = {}
end

function request()
  i_body = i_body % #bodies + 1
  i_path = i_path % #paths + 1
  return wrk.format("POST", paths[i_path], headers, bodies[i_body])
end

function delay()
  if mean_delay_ms == nil then return 0 end
  return -math.log(1 - math.random()) * mean_delay_ms
end

function response(code, hdrs, body)
  n = n + 1
  status[code] = (status[code] or 0) + 1
  if code ~= 200 then return end
  ok = ok + 1
  local exit = string.match(body, '"exit":(%d+)')
  if exit then exits[exit] = (exits[exit] or 0) + 1 end
  if string.find(body, '"reason":"deadline"', 1, true) then early = early + 1 end
  local latency = tonumber(string.match(body, '"latency_ms":([%d%.eE%-]+)'))
  if deadline and latency and latency <= deadline then server_met = server_met + 1 end
end

local function encode(t)
  local parts = {}
  for k, v in pairs(t) do parts[#parts + 1] = string.format('"%s":%s', tostring(k), tostring(v)) end
  return "{" .. table.concat(parts, ",") .. "}"
end

function done(summary, latency, requests)
  local total = { n = 0, ok = 0, server_met = 0, early = 0 }
  local codes, exit_counts = {}, {}
  for _, t in ipairs(threads) do
    for _, k in ipairs({ "n", "ok", "server_met", "early" }) do total[k] = total[k] + t:get(k) end
    for code, c in pairs(t:get("status")) do codes[code] = (codes[code] or 0) + c end
    for e, c in pairs(t:get("exits")) do exit_counts[e] = (exit_counts[e] or 0) + c end
  end
  -- Share of responses at or under the deadline, from wrk's latency histogram (binary search).
  local under = -1
  local deadline = tonumber(os.getenv("BENCH_DEADLINE_MS") or "")
  if deadline then
    local lo, hi = 0.0, 100.0
    if latency.max <= deadline * 1000 then
      lo = 100.0
    else
      for _ = 1, 40 do
        local mid = (lo + hi) / 2
        if latency:percentile(mid) <= deadline * 1000 then lo = mid else hi = mid end
      end
    end
    under = lo / 100
  end
  local e = summary.errors
  io.write("BENCH_JSON {",
    string.format('"requests":%d,"duration_us":%d,"bytes":%d,', summary.requests, summary.duration, summary.bytes),
    string.format('"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},',
      e.connect, e.read, e.write, e.status, e.timeout),
    string.format('"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,',
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean),
    string.format('"answered":%d,"ok":%d,"server_met":%d,"early_by_deadline":%d,"share_under_deadline":%.6f,',
      total.n, total.ok, total.server_met, total.early, under),
    '"status":', encode(codes), ',"exits":', encode(exit_counts), "}\n")
end
