module votes-engine/perf/sse_client

go 1.19
