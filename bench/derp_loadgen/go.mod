module wiremesh/bench/derp_loadgen

go 1.27.3

require (
	go4.org/mem v0.0.0-20240501181205-ae6ca9944745
	tailscale.com v1.96.5
)

require (
	github.com/go-json-experiment/json v0.0.0-20250813024750-ebf49471dced // indirect
	golang.org/x/crypto v0.46.0 // indirect
	golang.org/x/exp v0.0.0-20250620022241-b7579e27df2b // indirect
	golang.org/x/sys v0.40.0 // indirect
	golang.org/x/time v0.12.0 // indirect
)
