"""Lightning's rich model summary, without the FLOPs it did not count."""

from lightning.pytorch.callbacks import RichModelSummary


class ParameterSummary(RichModelSummary):
    """Lightning's rich model summary; its FLOPs column and total only where it counted FLOPs.

    Lightning counts FLOPs by running the module on its `example_input_array`, which these modules
    leave unset (on a sharded run that forward would run on rank 0 alone and stall the others), and
    then shows a FLOPs column of zeros and "Total FLOPs: 0". ThroughputMonitor reports the real rate.
    """

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        if total_flops:
            return RichModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                              total_training_modes, total_flops, **summarize_kwargs)
        from rich import get_console
        from rich.table import Table
        from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, justify="right" if name in ("Params", "Params per Device") else "left")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        grid = Table.grid(expand=True)
        for label, value in (
            ("Trainable params", get_human_readable_count(int(trainable_parameters))),
            ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
            ("Total params", get_human_readable_count(int(total_parameters))),
            ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
            ("Modules in train mode", total_training_modes["train"]),
            ("Modules in eval mode", total_training_modes["eval"]),
        ):
            grid.add_row(f"[bold]{label}[/]: {value}")
        console = get_console()
        console.print(table)
        console.print(grid)
