-- Used by bench_feedback.py: each line of the file given after `--` is the body of one
-- POST /v1/feedback, sent once; a connection with nothing left to send idles. After the last answer
-- it prints ALL-ANSWERED, and the benchmark stops wrk with SIGINT (wrk's main thread sleeps for
-- the whole -d duration whatever its threads do; SIGINT ends that sleep and wrk reports the time
-- actually taken).
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  bodies = {}
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
  sent, answered, accepted, refused = 0, 0, 0, 0
  headers = {["Content-Type"] = "application/json"}
  probed = false
end

function request()
  if not probed then
    -- wrk 4.1 calls request() once per thread before connecting and never sends that request. In
    -- case another version does send it, it asks for a path that answers 404, not counted below.
    probed = true
    return wrk.format("GET", "/v1/feedback-probe")
  end
  if sent >= #bodies then
    return ""  -- nothing left to send: this connection idles until the run stops
  end
  sent = sent + 1
  return wrk.format("POST", "/v1/feedback", headers, bodies[sent])
end

function response(status, hdrs, body)
  if status == 404 then return end  -- the probe
  answered = answered + 1
  if status == 200 then accepted = accepted + 1 else refused = refused + 1 end
  if answered == #bodies then
    io.write("ALL-ANSWERED\n")
    io.flush()
  end
end

function done(summary, latency, requests)
  local t = threads[1]
  io.write(string.format(
    '\nRESULT {"sent":%d,"answered":%d,"accepted":%d,"refused":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,"socket_errors":%d}\n',
    t:get("sent"), t:get("answered"), t:get("accepted"), t:get("refused"), summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
