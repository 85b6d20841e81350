-- wrk script: cast votes, each from a distinct voter, and count responses by status.
--
-- Every request is `POST /v1/polls/<poll>/votes` with body `{"option":"<opt>"}` and
-- `Authorization: Bearer <token>`. Tokens come from a file, one per line, and each is
-- used once: wrk thread i (0-based) of T takes lines i+1, i+1+T, i+1+2T, ... so no two
-- threads share a voter. When a thread runs out of tokens it stops itself instead of
-- reusing any (a repeated voter would measure the duplicate path, not the vote path);
-- the summary then says `"exhausted":true` and the run must not be reported as a rate.
--
-- Configuration, from the environment (read in each thread's init):
--   VOTES_TOKENS_FILE  path of the token file (required)
--   VOTES_WRK_THREADS  the same number as wrk's -t (required: it sets the line stride)
--   VOTES_POLL         poll id (default "bench")
--   VOTES_POLLS        optional: comma-separated poll ids, used in turn (overrides
--                      VOTES_POLL); request k goes to poll k mod P with option k mod O
--   VOTES_OPTIONS      comma-separated options, used in turn (default "a")
--   VOTES_SERIES       optional: "1" counts responses per second of the run by status
--                      class (201 / other), in the summary's "series"
--   VOTES_RATE_PER_S   optional: pace the whole run at this many requests per second
--                      (all threads together); unset, every connection sends as fast
--                      as it gets answers
--   VOTES_FORWARDED_FOR  optional: an X-Forwarded-For header on every vote, for an engine
--                      that trusts 127.0.0.1 as its proxy (docs/security.md): "spread"
--                      gives vote k of the thread its own address, 250 per /24 in turn
--                      (10.x.y.1-250), so no address or prefix limit is reached at any
--                      rate; any other value is sent as is (one client address)
--   VOTES_SPREAD_FIRST  optional: with "spread", start at vote k = this instead of 0, so
--                      a second run against the same engine (a measured run after its
--                      warm-up) gets addresses of its own: reusing the first run's /24s
--                      gives each of them twice the voters, which the velocity rules
--                      rightly take for a bot farm
--
-- Pacing uses wrk's delay() hook: before each request, a connection asks delay() how
-- many milliseconds to wait. Each thread hands out send slots rate/threads apart, one
-- per request, in order, and a connection waits until its slot. So the connections
-- together send at the rate (each at about rate/connections), as long as enough of them
-- are free. A connection that comes free after its slot has passed sends at once (it is
-- "late"), so the schedule catches up after a slow patch, but by at most
-- catch_up_ms_max of slots: older slots are dropped, not sent in one burst. It is still
-- a closed loop: a connection waits for its answer before it asks for its next slot, and
-- wrk starts the latency clock when the request is written, not at the slot, so latency
-- percentiles leave out the time a late request waited for a free connection
-- (coordinated omission). The summary counts late sends (by more than 1 ms), their
-- lateness and the dropped slots, to show how much that hides. wrk's timers have 1 ms resolution.
--
-- Each thread writes `VOTES_WRK_THREAD_READY <index> <tokens>` to stderr once its tokens
-- are loaded. At the end, done() prints one line for machines to read:
--   VOTES_WRK_SUMMARY {"statuses":{"201":n,...},"latency_us":{...},...}

local summary_tag = "VOTES_WRK_SUMMARY "

local rate_per_s = tonumber(os.getenv("VOTES_RATE_PER_S") or "")
local series_on = os.getenv("VOTES_SERIES") == "1"

-- A monotonic clock in milliseconds, for pacing and the per-second series: plain Lua has
-- none finer than a second, but wrk runs LuaJIT, whose ffi reaches clock_gettime.
local now_ms = nil
if rate_per_s ~= nil or series_on then
   local ffi = require("ffi")
   ffi.cdef([[
      typedef struct { long tv_sec; long tv_nsec; } votes_timespec;
      int clock_gettime(int clock_id, votes_timespec *spec);
   ]])
   local CLOCK_MONOTONIC = 1
   local timespec = ffi.new("votes_timespec")
   now_ms = function()
      ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
      return tonumber(timespec.tv_sec) * 1000 + tonumber(timespec.tv_nsec) / 1e6
   end
end

-- Per-thread state. The main Lua state (where setup and done run, and where wrk checks
-- one request at start-up) never calls init, so request() must work without it.
tokens = nil
token_count = 0
token_next = 1
option_prefixes = nil
option_bodies = nil
option_next = 1
forwarded_for = nil
spread_first = 0
counts = {}
sent = 0
sent_after_exhaustion = 0
exhausted = false

local threads = {}

function setup(thread)
   thread:set("thread_index", #threads)
   table.insert(threads, thread)
end

local function split_commas(text)
   local parts = {}
   for part in string.gmatch(text, "[^,]+") do
      table.insert(parts, part)
   end
   return parts
end

local function load_tokens(path, thread_index, thread_count)
   local file, err = io.open(path, "r")
   if not file then
      error("VOTES_TOKENS_FILE: " .. tostring(err))
   end
   local loaded = {}
   local line_index = 0
   for line in file:lines() do
      if line_index % thread_count == thread_index and #line > 0 then
         loaded[#loaded + 1] = line
      end
      line_index = line_index + 1
   end
   file:close()
   return loaded
end

function init(args)
   local path = os.getenv("VOTES_TOKENS_FILE")
   local thread_count = tonumber(os.getenv("VOTES_WRK_THREADS") or "")
   if not path or not thread_count then
      error("set VOTES_TOKENS_FILE and VOTES_WRK_THREADS (equal to wrk -t)")
   end
   local polls = split_commas(os.getenv("VOTES_POLLS") or os.getenv("VOTES_POLL") or "bench")
   local options = split_commas(os.getenv("VOTES_OPTIONS") or "a")

   forwarded_for = os.getenv("VOTES_FORWARDED_FOR")
   spread_first = tonumber(os.getenv("VOTES_SPREAD_FIRST") or "0")
   tokens = load_tokens(path, thread_index, thread_count)
   token_count = #tokens

   -- Requests are built by concatenation around the token: wrk.format copies the header
   -- table on every call, which would charge the generator for work the server never sees.
   -- One prefix per (poll, option) pair, max(P, O) pairs: request k uses pair k mod n.
   option_prefixes = {}
   option_bodies = {}
   local pairs_count = math.max(#polls, #options)
   for i = 1, pairs_count do
      local poll = polls[((i - 1) % #polls) + 1]
      local option = options[((i - 1) % #options) + 1]
      local body = '{"option":"' .. option .. '"}'
      option_bodies[i] = body
      option_prefixes[i] = "POST /v1/polls/" .. poll .. "/votes HTTP/1.1\r\n"
         .. "Host: " .. wrk.headers["Host"] .. "\r\n"
         .. "Content-Type: application/json\r\n"
         .. "Content-Length: " .. #body .. "\r\n"
         .. "Authorization: Bearer "
   end
   -- Unbuffered, so the harness can start sampling CPU only once loading is over.
   io.stderr:write("VOTES_WRK_THREAD_READY " .. thread_index .. " " .. token_count .. "\n")
end

local function not_a_vote()
   return "GET /readyz HTTP/1.1\r\nHost: " .. (wrk.headers["Host"] or "localhost") .. "\r\n\r\n"
end

-- The client address of the next vote (VOTES_FORWARDED_FOR): thread t starts at
-- 10.<16 t>.0.0 and moves to the next /16 every 64,000 votes, so threads do not share a
-- prefix until one has sent a million votes.
function client_address()
   if forwarded_for ~= "spread" then
      return forwarded_for
   end
   local k = spread_first + sent
   return "10." .. ((thread_index * 16 + math.floor(k / 64000)) % 256) .. "."
      .. (math.floor(k / 250) % 256) .. "." .. (k % 250 + 1)
end

function request()
   if tokens == nil then
      return not_a_vote()
   end
   if token_next > token_count then
      -- Out of voters: stop this thread. Connections already asking for a request in this
      -- event-loop turn get a harmless non-vote, counted apart.
      if not exhausted then
         exhausted = true
         wrk.thread:stop()
      end
      sent_after_exhaustion = sent_after_exhaustion + 1
      return not_a_vote()
   end
   local token = tokens[token_next]
   token_next = token_next + 1
   local i = option_next
   option_next = (i % #option_bodies) + 1
   sent = sent + 1
   if forwarded_for ~= nil then
      return option_prefixes[i] .. token .. "\r\nX-Forwarded-For: " .. client_address()
         .. "\r\n\r\n" .. option_bodies[i]
   end
   return option_prefixes[i] .. token .. "\r\n\r\n" .. option_bodies[i]
end

if rate_per_s ~= nil then
   if rate_per_s <= 0 then
      error("VOTES_RATE_PER_S must be positive, got " .. os.getenv("VOTES_RATE_PER_S"))
   end
   local catch_up_ms_max = 1000
   slot_next_ms = nil
   slot_interval_ms = nil
   paced_sends = 0
   late_sends = 0
   late_ms_sum = 0
   late_ms_max = 0
   slots_dropped = 0

   -- Defined only when pacing: wrk enables its delay path whenever a delay() exists.
   function delay()
      if slot_interval_ms == nil then
         local threads = tonumber(os.getenv("VOTES_WRK_THREADS") or "") or 1
         slot_interval_ms = 1000 * threads / rate_per_s
      end
      local now = now_ms()
      if slot_next_ms == nil then
         slot_next_ms = now
      elseif slot_next_ms < now - catch_up_ms_max then
         local dropped = math.floor((now - catch_up_ms_max - slot_next_ms) / slot_interval_ms)
         slots_dropped = slots_dropped + dropped
         slot_next_ms = slot_next_ms + dropped * slot_interval_ms
      end
      local wait_ms = slot_next_ms - now
      slot_next_ms = slot_next_ms + slot_interval_ms
      paced_sends = paced_sends + 1
      if wait_ms < 0 then
         -- Late by less than wrk's timer resolution is on time.
         if wait_ms < -1 then
            late_sends = late_sends + 1
            late_ms_sum = late_ms_sum - wait_ms
            late_ms_max = math.max(late_ms_max, -wait_ms)
         end
         return 0
      end
      return math.floor(wait_ms + 0.5)
   end
end

-- The first body seen for each status other than 201, to say why votes were refused.
samples = {}

-- Per-second counts (VOTES_SERIES=1), keyed by whole seconds of the monotonic clock so
-- that done() can line the threads up: series_created[second] and series_other[second].
series_created = {}
series_other = {}

function response(status, headers, body)
   counts[status] = (counts[status] or 0) + 1
   if series_on then
      local second = math.floor(now_ms() / 1000)
      if status == 201 then
         series_created[second] = (series_created[second] or 0) + 1
      else
         series_other[second] = (series_other[second] or 0) + 1
      end
   end
   if status ~= 201 and samples[status] == nil then
      samples[status] = string.sub(body, 1, 300)
   end
end

local function json_string(text)
   local escaped = string.gsub(text, '[%c"\\]', function(c)
      return string.format("\\u%04x", string.byte(c))
   end)
   return '"' .. escaped .. '"'
end

local function json_object(pairs_list)
   local parts = {}
   for _, kv in ipairs(pairs_list) do
      parts[#parts + 1] = '"' .. kv[1] .. '":' .. kv[2]
   end
   return "{" .. table.concat(parts, ",") .. "}"
end

local function integer(value)
   return string.format("%d", value)
end

function done(summary, latency, requests)
   local statuses = {}
   local sample_parts = {}
   local sampled = {}
   local sent_total, tokens_total, after_total = 0, 0, 0
   local exhausted_threads = 0
   local pacing = { sends = 0, late = 0, late_ms_sum = 0, late_ms_max = 0, dropped = 0 }
   for _, thread in ipairs(threads) do
      if rate_per_s ~= nil then
         pacing.sends = pacing.sends + thread:get("paced_sends")
         pacing.late = pacing.late + thread:get("late_sends")
         pacing.late_ms_sum = pacing.late_ms_sum + thread:get("late_ms_sum")
         pacing.late_ms_max = math.max(pacing.late_ms_max, thread:get("late_ms_max"))
         pacing.dropped = pacing.dropped + thread:get("slots_dropped")
      end
      for status, n in pairs(thread:get("counts")) do
         local key = integer(status)
         statuses[key] = (statuses[key] or 0) + n
      end
      for status, body in pairs(thread:get("samples")) do
         local key = integer(status)
         if not sampled[key] then
            sampled[key] = true
            sample_parts[#sample_parts + 1] = '"' .. key .. '":' .. json_string(body)
         end
      end
      sent_total = sent_total + thread:get("sent")
      tokens_total = tokens_total + thread:get("token_count")
      after_total = after_total + thread:get("sent_after_exhaustion")
      if thread:get("exhausted") then
         exhausted_threads = exhausted_threads + 1
      end
   end

   -- The per-second series, from the first second any thread saw to the last.
   local merged_created, merged_other = {}, {}
   local first_second, last_second = nil, nil
   if series_on then
      for _, thread in ipairs(threads) do
         for _, pair in ipairs({ { "series_created", merged_created }, { "series_other", merged_other } }) do
            for second, n in pairs(thread:get(pair[1])) do
               pair[2][second] = (pair[2][second] or 0) + n
               first_second = first_second and math.min(first_second, second) or second
               last_second = last_second and math.max(last_second, second) or second
            end
         end
      end
   end
   local series_json = "null"
   if first_second ~= nil then
      local created_parts, other_parts = {}, {}
      for second = first_second, last_second do
         created_parts[#created_parts + 1] = integer(merged_created[second] or 0)
         other_parts[#other_parts + 1] = integer(merged_other[second] or 0)
      end
      series_json = json_object({
         { "created", "[" .. table.concat(created_parts, ",") .. "]" },
         { "other", "[" .. table.concat(other_parts, ",") .. "]" },
      })
   end

   local status_parts = {}
   for key, n in pairs(statuses) do
      status_parts[#status_parts + 1] = '"' .. key .. '":' .. integer(n)
   end

   local latency_pairs = {}
   for _, p in ipairs({ 50, 75, 90, 99, 99.9, 99.99 }) do
      latency_pairs[#latency_pairs + 1] = { "p" .. p, integer(latency:percentile(p)) }
   end
   latency_pairs[#latency_pairs + 1] = { "min", integer(latency.min) }
   latency_pairs[#latency_pairs + 1] = { "mean", string.format("%.1f", latency.mean) }
   latency_pairs[#latency_pairs + 1] = { "max", integer(latency.max) }

   local errors = summary.errors
   local line = json_object({
      { "statuses", "{" .. table.concat(status_parts, ",") .. "}" },
      { "samples", "{" .. table.concat(sample_parts, ",") .. "}" },
      { "latency_us", json_object(latency_pairs) },
      { "duration_us", integer(summary.duration) },
      { "requests", integer(summary.requests) },
      { "bytes", integer(summary.bytes) },
      { "errors", json_object({
         { "connect", integer(errors.connect) },
         { "read", integer(errors.read) },
         { "write", integer(errors.write) },
         { "status", integer(errors.status) },
         { "timeout", integer(errors.timeout) },
      }) },
      { "threads", integer(#threads) },
      { "threads_expected", os.getenv("VOTES_WRK_THREADS") or "null" },
      { "tokens_loaded", integer(tokens_total) },
      { "votes_sent", integer(sent_total) },
      { "sent_after_exhaustion", integer(after_total) },
      { "threads_exhausted", integer(exhausted_threads) },
      { "exhausted", exhausted_threads > 0 and "true" or "false" },
      { "series", series_json },
      { "rate_per_s_target", rate_per_s and string.format("%.1f", rate_per_s) or "null" },
      { "pacing", rate_per_s and json_object({
         { "sends", integer(pacing.sends) },
         { "late_sends", integer(pacing.late) },
         { "late_ms_mean", string.format("%.2f", pacing.late_ms_sum / math.max(1, pacing.late)) },
         { "late_ms_max", string.format("%.2f", pacing.late_ms_max) },
         { "slots_dropped", integer(pacing.dropped) },
      }) or "null" },
   })
   io.write(summary_tag .. line .. "\n")
end
