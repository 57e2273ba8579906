-- Feeds wrk pre-signed, unique ingest requests: one per line of the file named by the
-- first script argument, starting at the line given by the second; each wrk thread
-- takes every n-th line so no two requests repeat.
local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local path, start, nthreads = args[1], tonumber(args[2]), tonumber(args[3])
  local path_prefix = args[4]
  requests = {}
  local index = 0
  for line in io.lines(path) do
    if index >= start and (index - start) % nthreads == id then
      local msg_id, ts, sig, body = line:match("([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)")
      requests[#requests + 1] = wrk.format("POST", path_prefix, {
        ["Content-Type"] = "application/json",
        ["webhook-id"] = msg_id,
        ["webhook-timestamp"] = ts,
        ["webhook-signature"] = sig,
      }, body)
    end
    index = index + 1
  end
  -- wrk calls request() once on the first thread before the run, to check the request
  -- it makes (script_verify_request): that call must not use up the thread's first line.
  position = 0
  if id == 0 then
    position = -1
  end
end

function request()
  position = position + 1
  if position > #requests then
    position = 1
  end
  return requests[math.max(position, 1)]
end
