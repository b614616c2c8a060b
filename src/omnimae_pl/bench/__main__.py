from omnimae_pl.bench.cli import main

main()
