-- What both wrk scripts of `make bench` share: reading the lists bench/wrk.py writes, and numbering
-- the threads (wrk calls the script's global setup() once per thread, in its main Lua state).
local common = { threads = {} }

-- The non-empty lines of the file at `path` (none when path is unset).
function common.lines(path)
  local out = {}
  if path == nil or path == "" then return out end
  for line in io.lines(path) do
    if line ~= "" then out[#out + 1] = line end
  end
  return out
end

-- The contents of every file listed in the file named by environment variable `name`.
function common.bodies(name)
  local out = {}
  for _, path in ipairs(common.lines(os.getenv(name))) do
    local f = assert(io.open(path, "rb"))
    out[#out + 1] = f:read("*a")
    f:close()
  end
  return out
end

function common.setup(thread)
  thread:set("id", #common.threads + 1)
  common.threads[#common.threads + 1] = thread
end

return common
