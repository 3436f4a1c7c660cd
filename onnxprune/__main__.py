from onnxprune.cli import main

raise SystemExit(main())
