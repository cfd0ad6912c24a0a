from pd.bench.cli import main

raise SystemExit(main())
