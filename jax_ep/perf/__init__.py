"""The measurement wing: what a decode step costs, predicted and measured.

  hardware     rates (H100_SXM, H200 presets) and the efficiency factors
  per_device   what one device holds and processes per micro-step (Layout, layout())
  collectives  the collectives' groups, bytes within and across nodes, and time
  cost         bytes and FLOPs per term, predict(), the floor (floor_operations, floor_s)
  calibrate    efficiency fitted to measured steps (calibrate), validate
  tables       the seed's table and scaling curves predicted (`jax-ep predict`)
  probes       bandwidth, matmul and all_to_all measured in this process
  plan         BenchSpec, the deployments to run, memory fitting before allocation
  runner       runs the plan: timings, floor and prediction per deployment (`jax-ep bench`)
  report       a result's calibration summary, markdown, plot and files

Nothing here reads flags: jax_ep/cli/ owns them.
"""
