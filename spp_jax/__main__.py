from spp_jax.cli import main

raise SystemExit(main())
