//go:build tools

// Package tools pins the weed command for `go build`.
package tools

import _ "github.com/seaweedfs/seaweedfs/weed"
