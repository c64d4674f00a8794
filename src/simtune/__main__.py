from simtune.cli.main import main

raise SystemExit(main())
