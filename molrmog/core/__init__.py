"""The core: what everything else stands on. The closed-form maths (`mixture`, `schedules`, `distributions`,
`samplers`, `losses`, `metrics`, `em`) and the plumbing (`errors`, `registry`, `options`, `artefacts`,
`outputs`). Imports nothing of molrmog outside this package."""
