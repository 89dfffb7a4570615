-- wrk script of the deadline runs in `make bench` (bench/slo.py): Poisson-like arrivals with a deadline, and every
-- request timed and scored on the client side.
--
-- Run with as many threads as connections (-tN -cN): each thread then has one connection, so a
-- response always belongs to the request its thread sent last, and LuaJIT's FFI clock times it.
--
-- Environment (set by bench/wrk.py):
--   BENCH_IMAGES       file listing image paths, one per line (sent round robin)
--   BENCH_LABELS       file listing each image's label, one per line (for accuracy)
--   BENCH_RATE         total requests per second over all connections (exponential waits); 0: none, each
--                      connection sends again as soon as it has its answer: the same image after a refusal
--                      (clients that retry at once), the next one after a 200
--   BENCH_PATH         the request path (default /classify; e.g. /classify?threshold=1 for full depth)
--   BENCH_CONNECTIONS  the -c value
--   BENCH_DEADLINE_MS  sent as X-Deadline-Ms; what "in time" means
-- done() prints one line "BENCH_JSON {...}".

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } anytime_timespec;
  int clock_gettime(int clk_id, anytime_timespec *tp);
]]
local ts = ffi.new("anytime_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

-- common.lua sits beside this script; wrk gives the script's path in its chunk name.
local common = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")
local lines, threads = common.lines, common.threads
setup = common.setup

function init(args)
  bodies, labels = common.bodies("BENCH_IMAGES"), {}
  for _, label in ipairs(lines(os.getenv("BENCH_LABELS"))) do labels[#labels + 1] = tonumber(label) end
  deadline = tonumber(os.getenv("BENCH_DEADLINE_MS"))
  headers = {
    ["Host"] = wrk.headers["Host"] or (wrk.host .. ":" .. wrk.port),
    ["Content-Type"] = "image/png",
    ["X-Deadline-Ms"] = tostring(deadline),
  }
  local rate = tonumber(os.getenv("BENCH_RATE"))
  local conns = tonumber(os.getenv("BENCH_CONNECTIONS") or "1")
  mean_delay_ms = rate > 0 and 1000 * conns / rate or 0
  path = os.getenv("BENCH_PATH") or "/classify"
  math.randomseed(7000 + id)
  i_body = (id * 7919) % #bodies
  sent, current, again = 0, 1, false
  n, ok, in_time, server_in_time, correct, refused, refused_fast, late_504, other = 0, 0, 0, 0, 0, 0, 0, 0, 0
  late_1ms = 0
  refused_max, answer_max, exits, early = 0, 0, {}, 0
end

function delay()
  if mean_delay_ms == 0 then return 0 end
  return -math.log(1 - math.random()) * mean_delay_ms
end

function request()
  if not again then i_body = i_body % #bodies + 1 end
  current = i_body
  sent = now_ms()
  return wrk.format("POST", path, headers, bodies[i_body])
end

function response(code, hdrs, body)
  local took = now_ms() - sent
  n = n + 1
  again = mean_delay_ms == 0 and (code == 503 or code == 504)
  if code == 200 then
    ok = ok + 1
    if took <= deadline then in_time = in_time + 1 end
    if took > deadline + 1 then late_1ms = late_1ms + 1 end
    if took > answer_max then answer_max = took end
    local latency = tonumber(string.match(body, '"latency_ms":([%d%.eE%-]+)'))
    if latency and latency <= deadline then server_in_time = server_in_time + 1 end
    local index = tonumber(string.match(body, '"index":(%d+)'))
    if index == labels[current] then correct = correct + 1 end
    local exit = string.match(body, '"exit":(%d+)')
    if exit then exits[exit] = (exits[exit] or 0) + 1 end
    if string.find(body, '"reason":"deadline"', 1, true) then early = early + 1 end
  elseif code == 503 or code == 504 then
    refused = refused + 1
    if took <= 2 then refused_fast = refused_fast + 1 end
    if took > refused_max then refused_max = took end
    if code == 504 then late_504 = late_504 + 1 end
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local keys = { "n", "ok", "in_time", "server_in_time", "correct", "refused", "refused_fast", "late_504", "other",
    "early", "late_1ms" }
  local total, exit_counts = {}, {}
  for _, k in ipairs(keys) do total[k] = 0 end
  local refused_max_all, answer_max_all = 0, 0
  for _, t in ipairs(threads) do
    for _, k in ipairs(keys) do total[k] = total[k] + t:get(k) end
    refused_max_all = math.max(refused_max_all, t:get("refused_max"))
    answer_max_all = math.max(answer_max_all, t:get("answer_max"))
    for e, c in pairs(t:get("exits")) do exit_counts[e] = (exit_counts[e] or 0) + c end
  end
  local parts = {}
  for _, k in ipairs(keys) do parts[#parts + 1] = string.format('"%s":%d', k, total[k]) end
  local exit_parts = {}
  for e, c in pairs(exit_counts) do exit_parts[#exit_parts + 1] = string.format('"%s":%d', e, c) end
  local e = summary.errors
  io.write("BENCH_JSON {", table.concat(parts, ","),
    string.format(',"duration_us":%d,"socket_errors":%d,"refused_max_ms":%.3f,"answer_max_ms":%.3f,',
      summary.duration, e.connect + e.read + e.write + e.timeout, refused_max_all, answer_max_all),
    '"exits":{', table.concat(exit_parts, ","), "}}\n")
end
