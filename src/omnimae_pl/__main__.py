from omnimae_pl.cli import main

main()
